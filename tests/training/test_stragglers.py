"""The straggler report: per-rank compute and data-wait times in ranks.jsonl and the metrics,
and a one-line warning naming a rank slower than its pipeline stage's median."""

import json
import logging

import pytest

from megatron_ct.training.stragglers import StepTimer

from launch import REPO, TINY, read_metrics, run_torchrun


def timer_of(stages, threshold=0.2) -> StepTimer:
    t = StepTimer.__new__(StepTimer)
    t.threshold, t.pp_stages, t.hosts = threshold, stages, [f"node{r // 2}" for r in range(len(stages))]
    return t


def test_warning_compares_ranks_of_one_pipeline_stage_only(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_ct"):
        # Stage 1 is slower than stage 0 throughout: different work, no straggler.
        timer_of([0, 0, 0, 1, 1, 1])._warn(10, [1.0, 1.0, 1.05, 3.0, 3.0, 3.1])
        assert caplog.text == ""
        timer_of([0, 0, 0, 1, 1, 1])._warn(10, [1.0, 1.0, 1.05, 3.0, 3.0, 4.0])
        assert caplog.text.count("straggler:") == 1
        assert "rank 5 (node2, pipeline stage 1) computes 33% slower than its stage's median" in caplog.text
        caplog.clear()
        timer_of([0, 0, 0], threshold=None)._warn(10, [1.0, 1.0, 9.0])
        assert caplog.text == ""


@pytest.mark.slow
def test_a_slow_rank_is_named_and_its_times_recorded(tmp_path):
    proc = run_torchrun(
        2,
        REPO / "tests" / "training" / "slow_rank.py",
        [*TINY, "train.train_iters=3", f"logging.log_dir={tmp_path}", "logging.straggler_threshold=0.5"],
        env={"CT_SLOW_RANK": "1:0.15"},
    )
    ranks = [json.loads(line) for line in (tmp_path / "ranks.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in ranks] == [1, 2, 3]
    for r in ranks:  # 2 micro-batches per rank and step: rank 1 spends 0.3 s more before the all-reduce
        assert r["compute_s"][1] > r["compute_s"][0] + 0.25, r
        assert len(r["data_wait_s"]) == 2 and r["pp_stage"] == [0, 0]
    assert all(m["slowest_rank"] == 1 for m in read_metrics(tmp_path))
    warnings = [li for li in (proc.stdout + proc.stderr).splitlines() if "straggler: rank 1 (" in li]
    assert len(warnings) == 3, proc.stderr[-3000:]
