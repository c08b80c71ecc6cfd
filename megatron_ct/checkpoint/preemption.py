"""SIGTERM handling for SLURM preemption: remember the signal, save at the step boundary.

SLURM sends SIGTERM to every task some time (``--signal``/``KillWait``) before killing
it. The handler only sets a flag; the training loop checks it after each step with an
all-reduce, so every rank agrees to save the same iteration even if only some of them
received the signal.
"""

from __future__ import annotations

import signal
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
