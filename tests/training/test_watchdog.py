"""Hang detection (megatron_ct/training/watchdog.py): a stopped rank makes the others stop in one
line with exit code 4 and their stacks on disk, within the timeout; the run resumes exactly."""

import time

import pytest

from megatron_ct.training.watchdog import HANG_FACTOR, HANG_FLOOR_S, LEARN_STEPS, Watchdog

from launch import REPO, TINY, losses, run_torchrun


def test_timeout_is_fixed_or_learned_from_the_slowest_step():
    assert Watchdog(0, None, timeout_s=7.0).timeout_s == 7.0
    w = Watchdog(0, None)
    assert w.timeout_s == HANG_FLOOR_S  # the first steps: start-up effects
    for _ in range(LEARN_STEPS):
        w.arm(1)
        w.disarm()
    assert w.timeout_s == HANG_FLOOR_S  # fast steps: the floor
    w._slowest = 100.0
    assert w.timeout_s == HANG_FACTOR * 100.0
    w.close()


@pytest.mark.slow
def test_a_stopped_rank_is_a_hang_the_others_report_and_the_run_resumes(tmp_path):
    common = [*TINY, "train.train_iters=4", "checkpoint.save_interval=1", "optim.lr_decay_style=cosine"]
    run_torchrun(2, REPO / "pretrain_ct.py", [*common, f"logging.log_dir={tmp_path / 'straight'}"])
    ck = tmp_path / "ck"
    t0 = time.monotonic()
    proc = run_torchrun(
        2,
        REPO / "tests" / "checkpoint" / "fault_injection.py",
        [*common, f"checkpoint.save={ck}", "train.hang_timeout_s=4"],
        # Rank 1 stays stopped past rank 0's 4 s timeout, then continues and finds rank 0 gone.
        env={"CT_FAULT": "sigstop_after_save:2", "CT_FAULT_WAKE_S": "12"},
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0 and time.monotonic() - t0 < 90
    # Rank 0 finished iteration 2 and waits for rank 1 in its collective preemption check.
    lines = [li for li in proc.stderr.splitlines() if li.startswith("error: hang (rank 0, iteration 2)")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "exiting 4" in lines[0]
    stack = (ck / "hang" / "iter2_rank0.txt").read_text()
    assert "has not finished after 4 s" in stack and "in all_reduce" in stack  # where rank 0 waits
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "2"
    # Requeued (here: run again), it resumes from iteration 2 with the uninterrupted losses.
    run_torchrun(2, REPO / "pretrain_ct.py", [*common, f"checkpoint.save={ck}", f"checkpoint.load={ck}"])
    straight, resumed = losses(tmp_path / "straight"), losses(ck)
    assert [resumed[i] for i in (1, 2, 3, 4)] == [straight[i] for i in (1, 2, 3, 4)]
