"""SIGTERM handling for SLURM preemption: remember the signal, save at the step boundary.

SLURM sends SIGTERM to every process of a job step (cancel, requeue, preemption, time limit)
``KillWait`` seconds before SIGKILL. The handler only sets a flag; the training loop checks it
after each step with an all-reduce, so every rank agrees to save the same iteration even if
only some of them received the signal. The checkpoint writer's helper processes get the
signal too; ``helpers_ignore_sigterm`` keeps them alive so that save completes.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


class PreemptionFlag:
    def __init__(self, enabled: bool, device: str) -> None:
        self._received = False
        self._device = device
        self._previous: Any = None
        if enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self._received = True

    def any_rank_received(self) -> bool:
        """Collective: True on all ranks if any rank got SIGTERM."""
        dev = torch.device("cuda", torch.cuda.current_device()) if self._device == "cuda" else torch.device("cpu")
        flag = torch.tensor([1 if self._received else 0], dtype=torch.int32, device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@contextlib.contextmanager
def helpers_ignore_sigterm() -> Iterator[None]:
    """Processes started inside this block (megatron-core's checkpoint helpers) keep SIGTERM
    blocked for life; this process still receives it.

    megatron-core's torch_dist save spawns a manager process on the first save and keeps it for
    the results queue of every later save, and forks one writer process per shard file during
    each save. A SIGTERM to the whole job kills them, and the save that follows (or the one in
    progress) fails with BrokenPipeError, leaving ``iter_N.partial``. A child inherits the
    signal mask of the thread that starts it, through fork and exec, so blocking SIGTERM here
    while the save creates them shields them; SIGKILL still ends them. Here the signal stays
    pending until the block ends, or another thread takes it: either way ``PreemptionFlag``
    sees it, the trainer finishes the save, then stops.

    Only when this process handles SIGTERM itself (``PreemptionFlag`` installed): otherwise the
    signal ends it and its helpers should end with it.
    """
    if not callable(signal.getsignal(signal.SIGTERM)) or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    from multiprocessing import resource_tracker

    # Started later (by the first spawn), the tracker would unblock SIGTERM on its way out.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
