"""LR schedules built from OptimConfig (megatron-core's OptimizerParamScheduler)."""

import math

import pytest

from megatron_ct.config import load_config
from megatron_ct.config.schedule import Schedule
from megatron_ct.training.freeze import GroupPolicy
from megatron_ct.training.scheduler import CTScheduler
from megatron_ct.training.stages import StageTracker


class FakeOptimizer:
    def __init__(self):
        self.param_groups = [{"params": []}]


def lrs(overrides, steps):
    cfg = load_config(None, overrides)
    sched = CTScheduler(FakeOptimizer(), cfg.optim, cfg.train.train_iters)
    out = []
    for _ in range(steps):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.step(1)
    return out


def test_no_warmup_starts_at_peak():
    got = lrs(["optim.lr=1e-3", "optim.lr_warmup_iters=0", "optim.lr_decay_style=constant", "train.train_iters=5"], 5)
    assert got == [1e-3] * 5


def test_warmup_then_cosine_to_min():
    got = lrs(
        [
            "optim.lr=1e-3",
            "optim.min_lr=1e-4",
            "optim.lr_warmup_iters=4",
            "optim.lr_warmup_init=0.0",
            "optim.lr_decay_style=cosine",
            "train.train_iters=20",
        ],
        21,
    )
    assert got[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    mid = 4 + 8  # halfway through decay
    assert got[mid] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert got[20] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(got[4:], got[5:], strict=False))


def test_linear_decay():
    got = lrs(["optim.lr=1e-3", "optim.min_lr=0.0", "optim.lr_decay_style=linear", "train.train_iters=10"], 11)
    assert got == pytest.approx([1e-3 * (1 - i / 10) for i in range(11)])


def test_wsd_is_flat_then_decays():
    got = lrs(
        [
            "optim.lr=1e-3",
            "optim.min_lr=1e-5",
            "optim.lr_decay_style=WSD",
            "optim.lr_wsd_decay_iters=4",
            "optim.lr_wsd_decay_style=linear",
            "train.train_iters=12",
        ],
        13,
    )
    assert got[:9] == pytest.approx([1e-3] * 9)  # stable until decay_iters - wsd_decay_iters
    assert got[10] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert got[12] == pytest.approx(1e-5)


def test_rewarm_from_nonzero_init():
    got = lrs(
        [
            "optim.lr=2e-4",
            "optim.lr_warmup_iters=2",
            "optim.lr_warmup_init=2e-5",
            "optim.lr_decay_style=constant",
            "train.train_iters=5",
        ],
        4,
    )
    assert got == pytest.approx([2e-5, 1.1e-4, 2e-4, 2e-4])
    assert not any(math.isnan(x) for x in got)


def test_frozen_group_stays_at_zero_during_warmup():
    cfg = load_config(
        None, ["optim.lr=1e-3", "optim.lr_warmup_iters=4", "optim.lr_warmup_init=1e-4", "train.train_iters=10"]
    )
    frozen = GroupPolicy(lr_mult=(0.0,))
    opt = FakeOptimizer()
    opt.param_groups.append({"params": [], "ct_group": frozen.key, "wd_mult": 1.0})
    stages = StageTracker(Schedule.from_config(cfg))
    stages.enter(stages.schedule.stages[0])
    sched = CTScheduler(opt, cfg.optim, 10, {frozen.key: frozen}, stages)
    for _ in range(6):
        assert opt.param_groups[1]["lr"] == 0.0
        sched.step(1)
    assert opt.param_groups[0]["lr"] > 0
