"""tools/merge_datasets.py: shards in, the unsharded files out; bad inputs exit 2 in one line."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")

from material import llama_sp_model_path  # noqa: E402

from megatron_ct.preprocess.pipeline import PreprocessConfig, preprocess  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_cli():
    spec = importlib.util.spec_from_file_location(
        "merge_datasets_cli", os.path.join(REPO, "tools", "merge_datasets.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def files(prefix: str) -> tuple[bytes, bytes]:
    return tuple(open(prefix + ext, "rb").read() for ext in (".bin", ".idx"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, str]:
    """(glob of 2 shard prefixes, the unsharded prefix) of one small corpus."""
    tmp = tmp_path_factory.mktemp("shards")
    for i in range(4):
        lines = [json.dumps({"text": f"file {i} document {j} 中文"}, ensure_ascii=False) for j in range(5)]
        (tmp / f"in{i}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def run(prefix: str, **shard) -> None:
        cfg = PreprocessConfig(inputs=[str(tmp / "in*.jsonl")], output_prefix=str(tmp / prefix),
                               tokenizer=llama_sp_model_path(), progress=False, **shard)  # fmt: skip
        preprocess(cfg)

    run("whole")
    for k in range(2):
        run("part", shard_index=k, num_shards=2)
    return str(tmp / "part-*-of-00002_text_document"), str(tmp / "whole_text_document")


def test_merging_the_shards_gives_the_unsharded_files(tmp_path, shards, capsys):
    pattern, whole = shards
    out = str(tmp_path / "merged_text_document")
    assert load_cli().main(["--input", pattern, "--output-prefix", out, "--no-progress"]) == 0
    assert "merged 2 prefix(es): 20 documents" in capsys.readouterr().out
    assert files(out) == files(whole)
    meta = json.load(open(out + ".meta.json"))
    assert meta["documents"] == 20 and meta["extra"]["inputs"][0].endswith("part-00000-of-00002_text_document")


def test_bad_inputs_exit_2_in_one_line(tmp_path, shards, capsys):
    pattern, whole = shards
    broken = str(tmp_path / "broken")
    for ext in (".bin", ".idx"):
        data = open(whole + ext, "rb").read()
        open(broken + ext, "wb").write(data[:-2] if ext == ".bin" else data)
    cases = [
        ([whole, broken], f"{broken}.bin: "),
        ([str(tmp_path / "nothing-*")], "matches no .idx file"),
        ([str(tmp_path / "missing")], "missing.idx: missing"),
    ]
    for inputs, fragment in cases:
        assert load_cli().main(["--input", *inputs, "--output-prefix", str(tmp_path / "m"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("merge_datasets.py: error:") and fragment in err and len(err.splitlines()) == 1
        assert not os.path.exists(str(tmp_path / "m.idx")) and not os.path.exists(str(tmp_path / "m.bin.tmp"))
