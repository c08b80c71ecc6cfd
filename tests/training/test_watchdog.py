"""Hang detection (megatron_ct/training/watchdog.py): a stopped rank makes the others stop in one
line with exit code 4 and their stacks on disk, within the timeout; the run resumes exactly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_ct.training.watchdog import HANG_FACTOR, HANG_FLOOR_S, LEARN_STEPS, SECTION_FLOOR_S, Watchdog

from launch import REPO, TINY, losses, run_single, run_torchrun


def test_timeout_is_fixed_or_learned_from_the_slowest_step():
    assert Watchdog(0, None, timeout_s=7.0).timeout_s == 7.0
    w = Watchdog(0, None)
    assert w.timeout_s == HANG_FLOOR_S  # the first steps: start-up effects
    for _ in range(LEARN_STEPS):
        w.arm(1)
        w.disarm()
    assert w.timeout_s == HANG_FLOOR_S  # fast steps: the floor
    w._slowest["step"] = 100.0
    assert w.timeout_s == HANG_FACTOR * 100.0
    w.close()


def test_evaluations_and_saves_have_their_own_timeouts():
    w = Watchdog(0, None, timeout_s=7.0, section_timeouts={"save": 60.0, "evaluation": None})
    assert w.timeout_for("save") == 60.0
    assert w.timeout_for("evaluation") == SECTION_FLOOR_S  # none seen yet
    w._slowest["evaluation"] = 1000.0
    assert w.timeout_for("evaluation") == HANG_FACTOR * 1000.0
    # Inside a step, a section stops the step's clock; afterwards the step is watched again.
    w.arm(3)
    with w.section("save", 3):
        assert (w._section, w._iteration) == ("save", 3)
    assert (w._section, w._iteration) == ("step", 3) and w._armed_at is not None
    assert w._slowest["save"] >= 0
    w.disarm()
    w.close()


def test_a_hung_save_is_a_hang_with_its_own_timeout(tmp_path):
    # The step's timeout is long; the save's (0.2 s) ends the process with exit 4 and its dump.
    proc = watchdog_child(
        tmp_path, "w.fixed.update(step=300, save=0.2)\nwith w.section('save', 5):\n    time.sleep(30)\n"
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, err
    assert err.splitlines()[-1].startswith(
        "error: hang (rank 0, iteration 5, save): no progress for 0 s, expected the save to finish;"
    )
    dump = (tmp_path / "hang" / "iter5_rank0.txt").read_text()
    assert dump.startswith("rank 0: the save after iteration 5 has not finished after 0 s (hang)\n")


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
        torchrun=True,  # what torchrun's agent does with a hung launch
    )
    assert proc.returncode != 0 and time.monotonic() - t0 < 90
    # Rank 0 finished iteration 2 and waits for rank 1 in its collective preemption check.
    lines = [li for li in proc.stderr.splitlines() if li.startswith("error: hang (rank 0, iteration 2)")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "exiting 4" in lines[0]
    stack = (ck / "hang" / "iter2_rank0.txt").read_text()
    assert "has not finished after 4 s" in stack and "in all_reduce" in stack  # where rank 0 waits
    assert stack.splitlines()[1].startswith('last collective: {"op": "all_reduce", "group_ranks": [0, 1]')
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "2"
    # Requeued (here: run again), it resumes from iteration 2 with the uninterrupted losses.
    run_torchrun(2, REPO / "pretrain_ct.py", [*common, f"checkpoint.save={ck}", f"checkpoint.load={ck}"])
    straight, resumed = losses(tmp_path / "straight"), losses(ck)
    assert [resumed[i] for i in (1, 2, 3, 4)] == [straight[i] for i in (1, 2, 3, 4)]


def watchdog_child(tmp_path, body: str) -> subprocess.Popen:
    """A process whose watchdog (timeout 0.2 s, no exit grace) fires on iteration 1 while ``body``
    runs; its dump goes to ``tmp_path/hang``."""
    script = (
        "import sys, time\n"
        "from megatron_ct.training import watchdog\n"
        "watchdog.EXIT_GRACE_S = 0\n"
        f"w = watchdog.Watchdog(0, {str(tmp_path)!r}, timeout_s=0.2)\n"
        "w.arm(1)\n" + body
    )
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_hang_dump_is_whole_or_absent_even_when_killed_during_it(tmp_path):
    proc = watchdog_child(tmp_path, "time.sleep(30)\n")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, err
    assert os.listdir(tmp_path / "hang") == ["iter1_rank0.txt"]  # no temporary file left
    dump = (tmp_path / "hang" / "iter1_rank0.txt").read_text()
    assert dump.startswith("rank 0: iteration 1 has not finished after 0 s (hang)\n")
    assert "line 6 in <module>" in dump  # the main thread's stack: the sleep in the body
    # Killed (a peer's SIGKILL, the node lost) in the middle of the dump: no file, not half a one.
    shutil.rmtree(tmp_path / "hang")
    stalled_dump = (
        "import faulthandler\n"
        "def dump(f, all_threads):\n"
        "    f.write('half a stack'); f.flush(); print('dumping', flush=True); time.sleep(30)\n"
        "faulthandler.dump_traceback = dump\n"
    )
    proc = watchdog_child(tmp_path, stalled_dump + "time.sleep(30)\n")
    try:
        assert proc.stdout.readline() == "dumping\n"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    assert [name for name in os.listdir(tmp_path / "hang") if not name.startswith(".")] == []


STUCK_PEER = """
import json, sys, time
import torch, torch.distributed as dist
from megatron_ct.training import watchdog
rank, folder = int(sys.argv[1]), sys.argv[2]
watchdog.trace_collectives()
dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
dist.all_reduce(torch.ones(1))  # both ranks: entered and returned
print(json.dumps(watchdog.last_collective()), flush=True)
if rank == 1:
    time.sleep(60)  # never joins the next one
watchdog.EXIT_GRACE_S = 0
watchdog.Watchdog(0, folder, timeout_s=0.5).arm(7)
dist.all_reduce(torch.zeros(2, 3, dtype=torch.bfloat16))
"""


def test_the_dump_names_the_last_collective_and_that_it_did_not_return(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STUCK_PEER, str(r), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        first = json.loads(procs[0].stdout.readline())
        _, err = procs[0].communicate(timeout=60)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert first["op"] == "all_reduce" and first["returned"] and first["tensors"] == ["float32[1]"]
    assert procs[0].returncode == 4
    assert "; last collective: all_reduce over 2 ranks, entered " in err.splitlines()[-1]
    lines = (tmp_path / "hang" / "iter7_rank0.txt").read_text().splitlines()
    assert lines[1].startswith("last collective: {")
    record = json.loads(lines[1].removeprefix("last collective: "))
    assert record.pop("entered_s_ago") >= 0.5
    assert record == {
        "op": "all_reduce",
        "group_ranks": [0, 1],
        "group_size": 2,
        "tensors": ["bfloat16[2, 3]"],
        "returned": False,
        "async_op": False,
        "thread": "MainThread",
    }


@pytest.mark.slow
def test_a_save_that_hangs_in_training_is_a_hang(tmp_path):
    # The trainer watches its saves with train.save_hang_timeout_s, not the step's timeout.
    ck = tmp_path / "ck"
    # The hung save is the first one: a real save takes seconds on a busy machine.
    args = ["train.train_iters=3", "checkpoint.save_interval=2", f"checkpoint.save={ck}", "train.save_hang_timeout_s=2"]
    script = REPO / "tests" / "checkpoint" / "fault_injection.py"
    proc = run_single(args, timeout=120, env={"CT_FAULT": "hang_in_save:2"}, script=script)
    assert proc.returncode == 4, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: hang")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: hang (rank 0, iteration 2, save): no progress for 2 s, expected the save to finish;"
    ), proc.stderr[-3000:]
    dump = (ck / "hang" / "iter2_rank0.txt").read_text()
    assert dump.startswith("rank 0: the save after iteration 2 has not finished after 2 s (hang)\n")
    assert "in hanging_save" in dump
    assert not (ck / "latest_checkpointed_iteration.txt").exists()
