"""Run pretrain_ct.py under torchrun in a subprocess, as a user would, and read its metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def run_torchrun(
    nproc: int,
    script: Path,
    args: list[str],
    timeout: float = 300,
    check: bool = True,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node nproc SCRIPT ARGS from the repo root."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
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
        proc = subprocess.CompletedProcess(cmd, rc, out.read(), err.read())
    if check and proc.returncode != 0:
        raise AssertionError(f"{Path(script).name} failed (rc={rc}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


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
    base = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # torchrun's variables would win
        base.pop(key, None)
    files, procs = [], []
    try:
        for rank in range(nproc):
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            files.append((out, err))
            rank_env = {
                **base,
                "SLURM_PROCID": str(rank),
                "SLURM_NTASKS": str(nproc),
                "SLURM_LOCALID": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            group = {"process_group": 0 if rank == 0 else procs[0].pid}
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=rank_env, cwd=REPO, **group))
        try:
            for p in procs:
                p.wait(timeout=timeout)
        finally:
            try:
                os.killpg(procs[0].pid, signal.SIGKILL)  # helpers a killed rank may have orphaned
            except ProcessLookupError:
                pass
        results = []
        for p, (out, err) in zip(procs, files, strict=True):
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(cmd, p.wait(), out.read(), err.read()))
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
) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node nproc pretrain_ct.py TINY + overrides."""
    return run_torchrun(nproc, script or REPO / "pretrain_ct.py", [*TINY, *overrides], timeout, check, env)


def read_metrics(log_dir: Path) -> list[dict]:
    path = Path(log_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(log_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(log_dir)}


def run_single(
    overrides: list[str], timeout: float = 300, env: dict | None = None, script: Path | None = None
) -> subprocess.CompletedProcess:
    """``python pretrain_ct.py TINY + overrides`` as one plain process (no torchrun), so its own
    exit status and stderr come back unwrapped."""
    cmd = [sys.executable, str(script or REPO / "pretrain_ct.py"), *TINY, *overrides]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        full_env.pop(key, None)
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**full_env, **(env or {})}, cwd=REPO, timeout=timeout
    )
