"""Run pretrain_ct.py as torchrun's ranks in subprocesses, as a user would, and read its metrics;
wait for what launched processes do (a file, a log line, a signal reaching them) with a deadline."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from megatron_ct.parallel.launch import RANK_VARIABLES, child_env, free_port, torchrun_command

REPO = Path(__file__).resolve().parents[1]


# A tiny model that still has GQA (4 heads, 2 groups), 4 layers for PP2 x VPP2,
# and a vocabulary that is not a multiple of 128 so padding is exercised.
TINY = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    "model.vocab_size=500",
    "model.max_position_embeddings=64",
    "data.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.precision=fp32",
    "optim.lr=1e-3",
    "optim.lr_decay_style=constant",
    "parallel.device=cpu",
]

# TINY as a Mixtral: 2 layers, 4 experts of width 64, 2 per token (the model keys, for
# tests/tiny_checkpoint.py, and as overrides to append to TINY's).
MIXTRAL = {"family": "mixtral", "num_layers": 2, "ffn_hidden_size": 64, "num_experts": 4, "moe_ffn_hidden_size": 64}
TINY_MIXTRAL = [*(f"model.{k}={v}" for k, v in MIXTRAL.items()), "model.moe_router_topk=2"]


def run_torchrun(
    nproc: int,
    script: Path,
    args: list[str],
    timeout: float = 300,
    check: bool = True,
    env: dict | None = None,
    torchrun: bool = False,
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc SCRIPT ARGS`` from the repo root, as the ranks see it.

    One process runs as ``python SCRIPT ARGS`` with the variables torchrun would give it. More
    run without torchrun's agent unless ``torchrun`` is set (the tests of what the agent does:
    stopping a hung or failed launch, its exit status): each rank gets torchrun's variables,
    all write to the same output, and the first rank to fail stops the others, as the agent
    does. The agent is an interpreter that imports torch (~1.5 s of CPU per launch), and
    the suite launches a few hundred; what a rank computes does not depend on it.

    The rendezvous port is free when chosen but not held: a process of a test running beside
    this one can take it first. The launch then fails before any rank trains ("address already
    in use"), and is tried again on another port (at most three times)."""
    launch = _run_torchrun_once if torchrun or nproc == 1 else _run_ranks_once
    for _ in range(3):
        proc = launch(nproc, script, args, timeout, env)
        if proc.returncode == 0 or not ("EADDRINUSE" in proc.stderr or "address already in use" in proc.stderr):
            break
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{Path(script).name} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _run_torchrun_once(nproc, script, args, timeout, env) -> subprocess.CompletedProcess:
    # One process runs without a torchrun agent beside it (half the interpreters to start), in
    # the environment torchrun would give it.
    port = free_port()
    cmd = torchrun_command(nproc, script, args, master_port=port, plain_for_one=True)
    full_env = child_env(env, threads=1)
    if nproc == 1:  # the variables torchrun gives its one child
        one = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        full_env = child_env({**one, **(env or {})}, threads=1)
    # Output goes to files, not pipes: a rank killed mid-save orphans megatron-core's
    # writer-manager process, which would hold a pipe open forever. The whole process
    # group is killed afterwards so no orphan outlives the test.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        popen = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=full_env, cwd=REPO, start_new_session=True)
        try:
            rc = popen.wait(timeout=timeout)
        finally:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())


@contextlib.contextmanager
def _process_group(cmd: list[str], envs: list[dict], outputs: list[tuple]):
    """One process of ``cmd`` per environment, all in one new process group (the first's), each
    writing to its (stdout, stderr) files. On leaving, the whole group is killed (helpers a
    killed rank may have orphaned) and every process reaped."""
    procs: list[subprocess.Popen] = []
    try:
        for env, (out, err) in zip(envs, outputs, strict=True):
            group = procs[0].pid if procs else 0
            procs.append(
                subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=REPO, process_group=group)
            )
        yield procs
    finally:
        if procs:
            try:
                os.killpg(procs[0].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait()


STOP_GRACE_S = 5.0
"""After the first rank fails, how long the others get between SIGTERM and SIGKILL."""


def _run_ranks_once(nproc, script, args, timeout, env) -> subprocess.CompletedProcess:
    """The ranks of a torchrun launch, started here: torchrun's variables, one process group,
    one output; exit status 0 when every rank exits 0, else 1 (torchrun's), the failed ranks
    named on stderr."""
    cmd = [sys.executable, str(script), *args]
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc)}
    common |= {"LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_WORLD_SIZE": str(nproc)}
    envs = [
        child_env({**common, "RANK": str(r), "LOCAL_RANK": str(r), "ROLE_RANK": str(r), **(env or {})}, threads=1)
        for r in range(nproc)
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        with _process_group(cmd, envs, [(out, err)] * nproc) as procs:
            deadline, stop_at = time.monotonic() + timeout, None
            while any(p.poll() is None for p in procs):
                if stop_at is None and any(p.returncode not in (None, 0) for p in procs):
                    stop_at = time.monotonic() + STOP_GRACE_S  # torchrun's rule: one rank fails, all stop
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGTERM)
                if stop_at is None and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                if stop_at is not None and time.monotonic() > stop_at:
                    break  # the group is killed on leaving
                time.sleep(0.05)
        codes = [p.returncode for p in procs]
        out.seek(0)
        err.seek(0)
        stderr = err.read() + "".join(f"rank {r} exited {c}\n" for r, c in enumerate(codes) if c)
        return subprocess.CompletedProcess(cmd, 1 if any(codes) else 0, out.read(), stderr)


def run_ranks(
    nproc: int,
    script: Path,
    args: list[str],
    timeout: float = 300,
    env: dict | None = None,
) -> list[subprocess.CompletedProcess]:
    """One process per rank, as ``srun`` starts them (no torchrun): SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID and MASTER_PORT set, all ranks in one new process group, so a test can signal
    every process of the job at once, as SLURM does. Returns each rank's result."""
    port = free_port()
    cmd = [sys.executable, str(script), *args]
    base = child_env(env, threads=1, drop=RANK_VARIABLES)  # torchrun's variables would win
    envs = [
        {**base, "SLURM_PROCID": str(r), "SLURM_NTASKS": str(nproc), "SLURM_LOCALID": str(r),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for r in range(nproc)
    ]  # fmt: skip
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(nproc)]
    try:
        with _process_group(cmd, envs, files) as procs:
            for p in procs:
                p.wait(timeout=timeout)
        results = []
        for p, (out, err) in zip(procs, files, strict=True):
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read()))
        return results
    finally:
        for out, err in files:
            out.close()
            err.close()


def run_trainer(
    nproc: int,
    overrides: list[str],
    timeout: float = 300,
    check: bool = True,
    env: dict | None = None,
    script: Path | None = None,
    torchrun: bool = False,
) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node nproc pretrain_ct.py TINY + overrides (see :func:`run_torchrun`)."""
    return run_torchrun(nproc, script or REPO / "pretrain_ct.py", [*TINY, *overrides], timeout, check, env, torchrun)


def read_metrics(log_dir: Path) -> list[dict]:
    path = Path(log_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(log_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(log_dir)}


def run_single(
    overrides: list[str], timeout: float = 300, env: dict | None = None, script: Path | None = None
) -> subprocess.CompletedProcess:
    """``python pretrain_ct.py TINY + overrides`` as one plain process (no torchrun, none of its
    variables), so its own exit status and stderr come back unwrapped."""
    cmd = [sys.executable, str(script or REPO / "pretrain_ct.py"), *TINY, *overrides]
    full_env = child_env(
        {"MASTER_PORT": str(free_port()), **(env or {})},
        threads=1,
        drop=(*RANK_VARIABLES, "SLURM_PROCID", "SLURM_NTASKS"),
    )
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout)


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    details: Callable[[], str] | None = None,
    interval: float = 0.05,
):
    """Poll ``predicate()`` until it returns something true, and return that. Past ``timeout``
    seconds, fail the test with ``what`` it waited for (and ``details()``, e.g. a log's tail).
    The predicate may raise AssertionError itself when the event can no longer come. The poll
    interval only bounds how late the event is seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}" + (f":\n{details()}" if details else ""))
        time.sleep(interval)


def _mask(status: str, field: str) -> int:
    """A signal mask (hex) from /proc/<pid>/status text, e.g. ``ShdPnd`` or ``SigBlk``."""
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")), 16)


def signal_arrived(pid: int, sig: int) -> bool:
    """``sig``, sent to process ``pid``, is no longer on its way (Linux /proc): the process is gone
    (or a zombie), has taken it (run its handler, ignored it) or blocks it in every thread, where it
    stays pending for good (a checkpoint helper started under ``helpers_ignore_sigterm``)."""
    bit = 1 << (sig - 1)
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return True
        if not _mask(Path(f"/proc/{pid}/status").read_text(), "ShdPnd") & bit:
            return True
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return True  # exited
    try:
        return all(_mask((t / "status").read_text(), "SigBlk") & bit for t in threads)
    except (FileNotFoundError, ProcessLookupError):
        return False  # a thread ended meanwhile: look again


def process_group(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids
