"""Starting training processes from Python: a free port, the torchrun command line, their environment.

The one place that builds ``python -m torch.distributed.run ...``: the merge sweep, the mixture
sweep, the quickstart, the benchmarks and the tests launch through it. Nothing here imports torch.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""torchrun's per-process variables: inherited by a child launched otherwise (srun, one plain
process), they would win over the child's own launcher."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it; nothing holds it afterwards)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp_init_method() -> str:
    """``init_method`` for a process group started by hand on this host (a free port)."""
    return f"tcp://127.0.0.1:{free_port()}"


def torchrun_command(
    nproc: int,
    script: str | os.PathLike,
    args: Sequence[str] = (),
    *,
    master_port: int | None = None,
    standalone: bool = False,
    python: str | None = None,
    plain_for_one: bool = False,
) -> list[str]:
    """``PYTHON -m torch.distributed.run [--standalone] --nproc_per_node N [--master_port P] SCRIPT ARGS``.

    ``master_port``: the rendezvous port (e.g. :func:`free_port`, so that launches side by side do
    not meet); None leaves torchrun's default. ``standalone``: torchrun picks its own rendezvous
    (no port). ``python``: the interpreter, this one by default. ``plain_for_one``: one process
    runs as a plain ``PYTHON SCRIPT ARGS``, without a torchrun agent beside it.
    """
    if nproc < 1:
        raise ValueError(f"torchrun_command: expected at least one process, got nproc={nproc}")
    if standalone and master_port is not None:
        raise ValueError("torchrun_command: --standalone picks its own rendezvous; give no master_port with it")
    python = python or sys.executable
    if plain_for_one and nproc == 1:
        return [python, str(script), *args]
    return [
        python,
        "-m",
        "torch.distributed.run",
        *(["--standalone"] if standalone else []),
        "--nproc_per_node",
        str(nproc),
        *(["--master_port", str(master_port)] if master_port is not None else []),
        str(script),
        *args,
    ]


def child_env(
    extra: Mapping[str, str] | None = None, *, threads: int | None = None, drop: Iterable[str] = ()
) -> dict[str, str]:
    """This process's environment for a launched trainer: Python warnings off
    (``PYTHONWARNINGS=ignore``), ``OMP_NUM_THREADS=threads`` when given, the variables in ``drop``
    removed (e.g. :data:`RANK_VARIABLES`), then ``extra`` on top."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    for key in drop:
        env.pop(key, None)
    return {**env, **(extra or {})}
