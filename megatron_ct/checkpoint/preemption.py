"""SIGTERM handling for SLURM preemption: remember the signal, save at a step boundary.

SLURM sends SIGTERM to every task some time (``--signal``/``KillWait``) before killing it.
The handler only sets a flag; after each step the trainer asks :meth:`PreemptionFlag.poll`,
an all-reduce of the flags, so every rank agrees to save the same iteration even if only
some of them received the signal. The flags travel through a CPU (gloo) group and are read
through a NumPy view: the check never synchronises the GPU. With ``save_on_sigterm`` off
nothing is installed and nothing is exchanged.

The checkpoint writer's helper processes get SIGTERM too (SLURM signals every process of the
step); :func:`helpers_ignore_sigterm` keeps them alive so that the save in progress completes.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


class PreemptionFlag:
    def __init__(self, enabled: bool, on_gpu: bool = False) -> None:
        """Collective when ``enabled`` (the same on every rank: it comes from the config)."""
        self.enabled = enabled
        self._received = False
        self._previous: Any = None
        self._group = None
        if not enabled:
            return
        self._previous = signal.signal(signal.SIGTERM, self._handler)
        if on_gpu and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # host tensors: no device round trip
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._view = self._flag.numpy()  # shares memory: reading it is not a torch call

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self._received = True

    def poll(self) -> bool:
        """Collective when enabled: True on all ranks if any rank got SIGTERM."""
        if not self.enabled:
            return False
        self._view[0] = 1 if self._received else 0
        if dist.is_initialized():
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(self._view[0])

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


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
