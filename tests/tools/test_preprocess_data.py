"""tools/preprocess_data.py: the CLI wires flags to preprocess() and fails in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")

from material import build_hf_llama_tokenizer, llama_sp_model_path  # noqa: E402

from megatron_ct.tokenizer import load_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tools", "preprocess_data.py")


def load_cli():
    spec = importlib.util.spec_from_file_location("preprocess_data_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_ids(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.fixture(scope="module")
def sp_path() -> str:
    return llama_sp_model_path()


def test_script_runs_as_subprocess_with_hf_tokenizer_and_two_workers(tmp_path):
    hf_dir = build_hf_llama_tokenizer(tmp_path / "hf")
    tok = load_tokenizer(hf_dir)
    records = [{"instruction": f"问题 {i}", "response": f"answer {i}"} for i in range(30)]
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    prefix = tmp_path / "out" / "sft"
    cmd = [
        sys.executable, SCRIPT, "--input", str(src), "--tokenizer", hf_dir,
        "--output-prefix", str(prefix), "--instruction-keys", "instruction", "response",
        "--workers", "2", "--log-interval", "5",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "preprocessed 30 docs" in result.stdout and "tokens/s" in result.stdout
    assert f"summary: {prefix}_summary.json" in result.stdout
    assert "Traceback" not in result.stderr and "TOKENIZERS_PARALLELISM" not in result.stderr
    docs = read_ids(f"{prefix}_instruction_document")
    assert [tok.decode(ids[:-1]) for ids in docs] == [f"{r['instruction']}\n{r['response']}" for r in records]
    assert json.loads((tmp_path / "out" / "sft_summary.json").read_text())["docs"] == 30


def test_main_flags_reach_preprocess(tmp_path, sp_path, capsys):
    tok = load_tokenizer(sp_path)
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello", "title": "hi"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "world", "title": "yo"}) + "\n")
    argv = [
        "--input", str(tmp_path / "*.jsonl"), "--json-keys", "body", "title", "--tokenizer", sp_path,
        "--output-prefix", str(tmp_path / "c"), "--no-append-eod", "--no-progress",
    ]  # fmt: skip
    assert load_cli().main(argv) == 0
    assert "EOD not appended" in capsys.readouterr().out
    assert read_ids(str(tmp_path / "c_body_document")) == [tok.encode("hello"), tok.encode("world")]
    assert read_ids(str(tmp_path / "c_title_document")) == [tok.encode("hi"), tok.encode("yo")]


@pytest.mark.parametrize("bad", ["input", "tokenizer"])
def test_main_reports_bad_paths_in_one_line(tmp_path, sp_path, capsys, bad):
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"text": "x"}) + "\n")
    missing = str(tmp_path / "missing")
    argv = [
        "--input", missing if bad == "input" else str(good),
        "--tokenizer", missing if bad == "tokenizer" else sp_path,
        "--output-prefix", str(tmp_path / "out" / "c"),
    ]  # fmt: skip
    assert load_cli().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "error:" in err and missing in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["wrong-json-keys", "empty-input"])
def test_zero_documents_exit_2_in_one_line_and_nothing_left(tmp_path, sp_path, capsys, case):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": "a document"}) + "\n" if case == "wrong-json-keys" else "")
    argv = ["--input", str(src), "--tokenizer", sp_path, "--output-prefix", str(tmp_path / "out" / "c"),
            "--json-keys", "content" if case == "wrong-json-keys" else "text", "--no-progress"]  # fmt: skip
    assert load_cli().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Skipped lines are logged as warnings first; the error itself is the last line, whole.
    assert err[-1].startswith("preprocess_data.py: error: no document to write")
    assert os.listdir(tmp_path / "out") == []


def test_shard_flags_name_the_outputs(tmp_path, sp_path, capsys):
    for i in range(3):
        (tmp_path / f"p{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
    argv = ["--input", str(tmp_path / "p*.jsonl"), "--tokenizer", sp_path, "--output-prefix", str(tmp_path / "c"),
            "--shard-index", "1", "--num-shards", "3", "--no-progress"]  # fmt: skip
    assert load_cli().main(argv) == 0
    out = capsys.readouterr().out
    assert "(shard 1 of 3, 1 unit(s))" in out and f"summary: {tmp_path / 'c'}-00001-of-00003_summary.json" in out
    tok = load_tokenizer(sp_path)
    assert [tok.decode(ids[:-1]) for ids in read_ids(str(tmp_path / "c-00001-of-00003_text_document"))] == ["doc 1"]
