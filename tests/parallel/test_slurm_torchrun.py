"""megatron_ct/parallel/slurm_torchrun.py, the sbatch script's per-node agent, without SLURM:
its trainers stay in its process group (where SLURM signals and kills a step), a SIGTERM to
that group lets them finish and the agent exits 0, and a failed rank's own status comes out.

tests/slurm/ runs it under a real SLURM."""

import contextlib
import os
import signal
import socket
import subprocess
import sys

import pytest

from megatron_ct.parallel.launch import child_env, free_port

from launch import REPO, wait_for

pytestmark = pytest.mark.slow

# A stand-in trainer: says its pid and process group once its SIGTERM handler is set, then
# idles; on SIGTERM it "saves" (a file) and exits 0. STATUS_OF_RANK_1 makes rank 1 exit so at
# once, and rank 0 exit 4 a second later (a watchdog that fires a little after another's).
TRAINER = """
import os, signal, sys, time
out = sys.argv[1]
rank = os.environ["RANK"]
if os.environ.get("STATUS_OF_RANK_1"):
    if rank == "1":
        sys.exit(int(os.environ["STATUS_OF_RANK_1"]))
    time.sleep(1)
    sys.exit(4)
def saved(*_):
    time.sleep(1)  # a save that outlasts the agent's shutdown timeout would be cut short by it
    open(os.path.join(out, f"saved{rank}"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, saved)
with open(os.path.join(out, f"rank{rank}.part"), "w") as f:
    f.write(f"{os.getpid()} {os.getpgrp()}")
os.rename(os.path.join(out, f"rank{rank}.part"), os.path.join(out, f"rank{rank}"))
while True:
    time.sleep(0.1)
"""


def start_agent(tmp_path, env=None, nnodes: int = 1, port: int | None = None) -> subprocess.Popen:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    cmd = [
        sys.executable,
        "-m",
        "megatron_ct.parallel.slurm_torchrun",
        "--nnodes",
        str(nnodes),
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port or free_port()}",
        "--rdzv-id",
        "42.0",
        "--max-restarts",
        "0",
        str(script),
        str(tmp_path),
    ]
    # Its own process group, as srun gives a task; SLURM_NODEID=0: it serves the rendezvous.
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env({"SLURM_NODEID": "0", **(env or {})}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def running_agent(tmp_path, env: dict | None = None, **kwargs):
    """The agent, its whole process group killed on the way out whatever the test did."""
    agent = start_agent(tmp_path, env, **kwargs)
    try:
        yield agent
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_to_the_group_reaches_the_trainers_which_finish(tmp_path):
    with running_agent(tmp_path) as agent:
        for rank in (0, 1):
            wait_for(lambda r=rank: (tmp_path / f"rank{r}").exists() or agent.poll() is not None, 60, f"rank {rank}")
            assert agent.poll() is None, agent.communicate()
            pgid = int((tmp_path / f"rank{rank}").read_text().split()[1])
            assert pgid == agent.pid, "a trainer outside the agent's process group escapes SLURM's signals"
        os.killpg(agent.pid, signal.SIGTERM)  # what SLURM does to a step it stops
        out, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err[-3000:]
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()
    assert "Traceback" not in err, err[-3000:]


def test_a_failed_ranks_status_is_the_agents(tmp_path):
    with running_agent(tmp_path, {"STATUS_OF_RANK_1": "3"}) as agent:
        out, err = agent.communicate(timeout=60)
    assert agent.returncode == 3, err[-3000:]
    # One line per failed rank; the status is the first failure's. Rank 0 ended on its own after
    # it: the agent leaves the others time (torchrun's SIGTERM would have killed it at once).
    lines = [line for line in err.splitlines() if line.startswith("torchrun on ")]
    host = socket.gethostname()
    assert lines == [f"torchrun on {host}: rank 0 exited 4", f"torchrun on {host}: rank 1 exited 3"], err
    assert "closing signal SIGTERM" not in err, err  # torchrun's log line for the SIGTERM not sent


def test_sigterm_during_the_rendezvous_stops_the_agent_at_once(tmp_path):
    # The second node never comes: the agent waits in the rendezvous, no trainer started. A
    # SIGTERM there (scancel, preemption) ends it now, not after SLURM's KillWait.
    port = free_port()
    with running_agent(tmp_path, nnodes=2, port=port) as agent:

        def serving() -> bool:  # node 0's agent serves the rendezvous store at the endpoint
            assert agent.poll() is None, agent.communicate()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
            return False

        wait_for(serving, 60, "the agent's rendezvous store")
        os.killpg(agent.pid, signal.SIGTERM)
        out, err = agent.communicate(timeout=15)
    assert agent.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert f"torchrun on {socket.gethostname()}: stopped by SIGTERM" in err.splitlines()
    assert not list(tmp_path.glob("rank*"))  # no trainer started
    assert "Traceback" not in err, err[-3000:]
