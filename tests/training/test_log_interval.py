"""The open log interval travels in the checkpoint (megatron_ct/training/metrics.py:LogInterval)."""

import pytest

from launch import losses, run_trainer

pytestmark = pytest.mark.slow


def test_resume_inside_a_log_interval_logs_the_interval_as_the_straight_run(tmp_path):
    """Logs every 4 steps, a save at step 2 (inside the interval 1-4). Resumed from it, at DP2 as
    saved and at DP1, the record of step 4 holds the mean loss over steps 1-4, as the run that
    went on logs it (the sums of steps 1-2 travel in the checkpoint), not over steps 3-4 alone;
    at DP2 only one data-parallel rank brings them back (no double count)."""
    common = ["train.train_iters=4", "logging.log_interval=4"]
    straight = tmp_path / "straight"
    run_trainer(2, [*common, f"checkpoint.save={straight}", "checkpoint.save_interval=2"])
    ref = losses(straight)
    assert sorted(ref) == [4]
    for nproc in (2, 1):
        log_dir = tmp_path / f"resumed_dp{nproc}"
        run_trainer(nproc, [*common, f"checkpoint.load={straight / 'iter_0000002'}", f"logging.log_dir={log_dir}"])
        got = losses(log_dir)
        assert sorted(got) == [4], got
        assert got[4] == pytest.approx(ref[4], rel=1e-6, abs=0), f"DP{nproc}: {got[4]} vs {ref[4]}"
