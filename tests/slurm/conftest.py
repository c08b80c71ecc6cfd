"""The real-SLURM tier: a two-node cluster on this host (one node with CT_SLURM_NODES=1) started
by .ci/slurm_up.sh (``.ci/run`` does it).

Tests submit with sbatch and follow jobs with ``scontrol show job`` (no accounting). Without a
cluster every test here is skipped with the reason slurm_up.sh gave, or how to start one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from launch import wait_for

CLUSTER_DIR = Path(os.environ.get("CT_SLURM_DIR", "/tmp/ct-slurm"))
FINISHED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _unavailable() -> str | None:
    """Why there is no cluster to test on, or None when there is one."""
    conf = os.environ.get("SLURM_CONF") or str(CLUSTER_DIR / "slurm.conf")
    if (CLUSTER_DIR / "unavailable").exists():  # .ci/slurm_up.sh's one line
        return (CLUSTER_DIR / "unavailable").read_text().strip()
    if not shutil.which("sbatch"):
        return "sbatch not installed (start a test cluster with: bash .ci/slurm_up.sh)"
    if not Path(conf).exists():
        return f"no SLURM cluster ({conf} missing; start one with: bash .ci/slurm_up.sh)"
    ping = subprocess.run(["scontrol", "ping"], env={**os.environ, "SLURM_CONF": conf}, capture_output=True, text=True)
    if "UP" not in ping.stdout:
        return f"slurmctld of {conf} does not answer (bash .ci/slurm_up.sh restarts it)"
    return None


@dataclass
class Cluster:
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def submit(self, script: Path, args: list[str], sbatch_args: list[str], env: dict[str, str], cwd: Path) -> str:
        proc = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args, str(script), *args],
            env={**self.env, **env},
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"sbatch refused the job: {proc.stderr.strip()}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def wait(self, job_id: str, states: set[str], timeout: float, log: Path | None = None) -> dict[str, str]:
        """Poll until the job is in one of ``states``; fail with its record and log otherwise
        (at once when it has finished in another state)."""

        def tail() -> str:
            return log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"

        def reached() -> dict[str, str] | None:
            info = self.job(job_id)
            if info["JobState"] in FINISHED and info["JobState"] not in states:
                raise AssertionError(f"job {job_id} is {info['JobState']}, expected {sorted(states)}:\n{tail()}")
            return info if info["JobState"] in states else None

        what = f"job {job_id} to be {' or '.join(sorted(states))}"
        return wait_for(
            reached,
            timeout,
            what,
            lambda: f"it is {self.state(job_id)}; slurmctld on it:\n{self.controller_log(job_id)}\nlog:\n{tail()}",
            interval=0.2,
        )

    def controller_log(self, job_id: str) -> str:
        """slurmctld's log lines about the job (what it decided, and when), to tell a late signal
        from a lost one when a test fails."""
        path = CLUSTER_DIR / "log" / "slurmctld.log"
        if not path.exists():
            return f"({path} missing)"
        pattern = re.compile(rf"JobId={job_id}\b|JOB {job_id}\b|job {job_id}\b")
        return "\n".join([line for line in path.read_text(errors="replace").splitlines() if pattern.search(line)][-30:])

    def release(self, job_id: str, time_limit_min: int | None = None) -> None:
        """Start a requeued job now (SLURM holds it back for a while after a requeue)."""
        # slurmd revokes a killed job's credential with a 1-second time stamp and refuses a
        # launch credential made within that second ("Job N already killed, do not launch batch
        # job": the job fails) -- what SLURM's own hold avoids. The requeue's time is the job's
        # new SubmitTime; the kill is stamped then or, at worst, in the second after it.
        requeued = datetime.fromisoformat(self.job(job_id)["SubmitTime"]).timestamp()
        wait_for(lambda: time.time() >= requeued + 2, 10, f"the second after job {job_id}'s requeue to pass")
        extra = [f"TimeLimit={time_limit_min}"] if time_limit_min else []
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now", *extra)

    def partitions(self) -> set[str]:
        return set(self.run("sinfo", "-h", "-o", "%R").split())

    def nodes(self) -> list[str]:
        return sorted(set(self.run("sinfo", "-h", "-N", "-o", "%N").split()))

    def why_one_node(self) -> str:
        """Why .ci/slurm_up.sh started one node instead of two (it writes the reason)."""
        why = CLUSTER_DIR / "one_node"
        return why.read_text().strip() if why.exists() else "started with one node (CT_SLURM_NODES=1?)"


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    reason = _unavailable()
    if reason:
        pytest.skip(f"SLURM tier skipped: {reason}")
    return Cluster(env={**os.environ, "SLURM_CONF": os.environ.get("SLURM_CONF") or str(CLUSTER_DIR / "slurm.conf")})
