"""Configuration faults: one line ``pretrain_ct.py: error: <key or file>: expected ...``, exit 2,
before anything is built (no traceback, no process group)."""

from __future__ import annotations

import pytest

from launch import run_single


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.lr=inf"], "optim.lr: expected a finite number > 0, got inf"),
        (["optim.lr=nan"], "optim.lr: expected a finite number > 0, got nan"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay: expected a finite number >= 0"),
        (["train.clip_grad=.inf"], "train.clip_grad: expected a finite number >= 0"),
        (["model.rope_scaling={rope_type: stretchy, factor: 2}"], "model.rope_scaling.rope_type='stretchy' is not"),
        (["parallel.device=cuda"], "parallel.device: expected auto or cpu on a machine without a visible CUDA GPU"),
        (["train.lr_mult={bodyy: 0.1}"], "train.lr_mult.bodyy: expected one of embedding, output"),
        (["train.trainable_params=['layers:1,x']"], "train.trainable_params: expected 'layers:<i>,<j>,...'"),
        (["data.max_regression={en: 0.02}"], "data.max_regression.en: expected a validation set named in data.valid"),
        (["train.lr_mult={new_vocab_rows: 2}"], "train.lr_mult.new_vocab_rows: needs a checkpoint.load written by"),
    ],
    ids=["lr-inf", "lr-nan", "wd", "clip", "rope", "cuda", "lr-class", "layers", "regression-set", "rows-provenance"],
)
def test_bad_value_is_one_line(overrides, expected):
    proc = run_single([*overrides, "train.train_iters=1"], timeout=120)
    lines = [li for li in proc.stderr.splitlines() if "pretrain_ct.py: error:" in li]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert expected in lines[0] and "Traceback" not in proc.stderr, lines[0]


def test_recipe_that_is_not_utf8_or_not_yaml(tmp_path):
    latin1 = tmp_path / "recipe.yaml"
    latin1.write_bytes("train:\n  train_iters: 2  # r\xe9sum\xe9\n".encode("latin-1"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    cases = ((latin1, "not UTF-8 text"), (broken, "not valid YAML"), (tmp_path / "no.yaml", "config file not found"))
    for path, expected in cases:
        proc = run_single(["--config", str(path)], timeout=60)
        assert proc.returncode == 2 and f"pretrain_ct.py: error: {path}: {expected}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback():
    proc = run_single(["optim.lr=inf", "--debug"], timeout=60)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
