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
