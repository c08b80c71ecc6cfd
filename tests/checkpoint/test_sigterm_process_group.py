"""SIGTERM to every process of the job (what SLURM does on preemption, cancel or requeue):
the save completes, every rank exits 0 with one line, and the resume is exact.

Ranks are started the way ``srun`` starts them (one process per rank, SLURM variables, no
torchrun), all in one process group that the fault injection signals with ``os.killpg``: the
ranks, and megatron-core's checkpoint helpers (the results-queue manager it keeps alive after the
first save, the writer processes it forks per save).
"""

import os

import pytest

from launch import REPO, TINY, losses, run_ranks

pytestmark = pytest.mark.slow
FAULTS = REPO / "tests" / "checkpoint" / "fault_injection.py"
RUN = [
    *TINY,
    "train.train_iters=6",
    "optim.lr_warmup_iters=2",
    "optim.lr_decay_style=cosine",
    "--use-distributed-optimizer",
    "checkpoint.save_interval=2",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    results = run_ranks(2, REPO / "pretrain_ct.py", [*RUN, f"logging.log_dir={out}"])
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
    return losses(out)


@pytest.mark.parametrize(
    "fault, saved",
    [
        # The signal comes between saves: the manager process megatron-core kept from the
        # save of iteration 2 gets it too, and the signal-triggered save of iteration 3 needs it.
        ("killpg_after:3", 3),
        # The signal comes while the periodic save of iteration 4 is being written.
        ("killpg_during_save:4", 4),
    ],
)
def test_sigterm_to_the_process_group_saves_and_resumes_exactly(tmp_path, reference, fault, saved):
    ck = tmp_path / "ck"
    results = run_ranks(2, FAULTS, [*RUN, f"checkpoint.save={ck}"], env={"CT_FAULT": fault})
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited {r.returncode}:\n{r.stderr[-4000:]}"
        assert "Traceback" not in r.stderr, r.stderr[-4000:]
    assert f"SIGTERM received: saved iteration {saved} and stopping" in results[0].stderr
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == str(saved)
    assert not [n for n in os.listdir(ck) if n.endswith(".partial")]
    assert sorted(losses(ck)) == list(range(1, saved + 1))  # stopped there, did not train on

    resumed = tmp_path / "resumed"
    results = run_ranks(2, REPO / "pretrain_ct.py", [*RUN, f"checkpoint.load={ck}", f"logging.log_dir={resumed}"])
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
    first, second = losses(ck), losses(resumed)
    assert sorted(second) == list(range(saved + 1, 7))
    assert [first[i] for i in range(1, saved + 1)] + [second[i] for i in range(saved + 1, 7)] == [
        reference[i] for i in range(1, 7)
    ]
