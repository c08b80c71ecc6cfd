"""Checkpoints through the real trainer: exact resume, reshard, crash safety, preemption."""

import os

import pytest

from launch import REPO, losses, read_metrics, run_trainer

pytestmark = pytest.mark.slow
FAULTS = REPO / "tests" / "checkpoint" / "fault_injection.py"
# Warmup + cosine so the scheduler state matters; DP2 with the distributed optimizer so
# sharded optimizer state round-trips.
SCHEDULE = [
    "train.train_iters=6",
    "optim.lr_warmup_iters=2",
    "optim.lr_decay_style=cosine",
    "--use-distributed-optimizer",
]


def test_resume_gives_identical_losses(tmp_path):
    run_trainer(2, SCHEDULE + [f"logging.log_dir={tmp_path / 'straight'}"])
    ck = tmp_path / "ck"
    run_trainer(2, SCHEDULE + ["train.exit_interval=3", f"checkpoint.save={ck}"])
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "3"
    run_trainer(2, SCHEDULE + [f"checkpoint.load={ck}", f"logging.log_dir={tmp_path / 'resumed'}"])
    straight, first, resumed = losses(tmp_path / "straight"), losses(ck), losses(tmp_path / "resumed")
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    assert [first[i] for i in (1, 2, 3)] + [resumed[i] for i in (4, 5, 6)] == [straight[i] for i in range(1, 7)]
    lr_straight = {r["iteration"]: r["lr"] for r in read_metrics(tmp_path / "straight")}
    lr_resumed = {r["iteration"]: r["lr"] for r in read_metrics(tmp_path / "resumed")}
    assert all(lr_resumed[i] == lr_straight[i] for i in (4, 5, 6))
    assert straight[6] < straight[1]


def test_reshard_tp2pp2_to_tp1pp1_tp1pp2_and_cp2(tmp_path):
    ck = tmp_path / "ck"
    big = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"]
    run_trainer(4, SCHEDULE + big + ["train.exit_interval=2", f"checkpoint.save={ck}"])
    first_losses = {}
    for name, nproc, flags in [
        ("TP2PP2", 4, big),
        ("TP1PP1", 1, []),
        ("TP1PP2", 2, ["--pipeline-model-parallel-size", "2"]),
        # CP replicates the weights; the distributed optimizer's state is sharded over DP x CP.
        ("CP2", 2, ["--context-parallel-size", "2"]),
    ]:
        out = tmp_path / name
        run_trainer(
            nproc, SCHEDULE + flags + ["train.train_iters=3", f"checkpoint.load={ck}", f"logging.log_dir={out}"]
        )
        got = losses(out)
        assert sorted(got) == [3], f"{name} should resume at iteration 3, logged {sorted(got)}"
        first_losses[name] = got[3]
    ref = first_losses["TP2PP2"]
    for name, value in first_losses.items():
        assert value == pytest.approx(ref, rel=1e-5), f"{name}: {value} vs TP2PP2 {ref}"


def test_killed_save_keeps_previous_checkpoint_latest(tmp_path):
    ck = tmp_path / "ck"
    proc = run_trainer(
        2,
        SCHEDULE + ["train.train_iters=4", "checkpoint.save_interval=1", f"checkpoint.save={ck}"],
        check=False,
        env={"CT_FAULT": "kill_during_save:2"},
        script=FAULTS,
    )
    assert proc.returncode != 0
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert (ck / "iter_0000001").is_dir()
    assert not (ck / "iter_0000002").exists()  # only the .partial directory, never the final name
    assert (ck / "iter_0000002.partial").is_dir()
    # The run resumes from the complete checkpoint, and the next save cleans the leftovers.
    run_trainer(
        2,
        SCHEDULE
        + [
            "train.train_iters=2",
            f"checkpoint.load={ck}",
            f"checkpoint.save={ck}",
            f"logging.log_dir={tmp_path / 'after'}",
        ],
    )
    assert sorted(losses(tmp_path / "after")) == [2]
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert not any(name.endswith(".partial") for name in os.listdir(ck))


def test_sigterm_saves_and_stops(tmp_path):
    ck = tmp_path / "ck"
    proc = run_trainer(2, SCHEDULE + [f"checkpoint.save={ck}"], env={"CT_FAULT": "sigterm_after:2"}, script=FAULTS)
    assert "SIGTERM received: saved iteration 2" in proc.stderr + proc.stdout
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(losses(ck)) == [1, 2]  # stopped right there, did not train on
