"""Hang detection: a per-rank watchdog over the training steps.

On a cluster the common failure is not a crash but a hang: one rank stops (a dead GPU, a
stopped process, a lost node) and every other rank waits in its next collective until the
process-group timeout, often the rest of the allocation. Each rank here runs a watchdog thread;
the trainer arms it at the start of a training step and disarms it at the end. A step that has
not ended after the timeout means this rank is stuck (in a collective waiting for a peer, or
itself): the watchdog writes every thread's Python stack to ``<dir>/hang/iter<N>_rank<r>.txt``
(the innermost frames show the collective it waits in; written atomically, so a kill during
the dump leaves no file or a whole one), logs one line, and ends the process
(after :data:`EXIT_GRACE_S`, so that the other stuck ranks write theirs too) with exit code
:data:`HANG_EXIT_CODE` (also left where the sbatch script reads the trainers'
status, :func:`megatron_ct.cli.record_exit_status`), which the script turns into a requeue; the
run then resumes from its last checkpoint.

The timeout is ``train.hang_timeout_s`` when set; otherwise it is learned: ``HANG_FLOOR_S``
during the first ``LEARN_STEPS`` steps (start-up effects), then ``HANG_FACTOR`` times the
slowest step seen so far, at least ``HANG_FLOOR_S``. Evaluations and checkpoint saves are not
steps: the watchdog is paused there (the process-group timeout, ``parallel.
distributed_timeout_minutes``, still bounds their collectives). A rank that is itself stopped
(SIGSTOP, a frozen host) cannot write its stack; its peers' dumps and their common iteration
say which rank never arrived.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time

from megatron_ct.atomic import atomic_write
from megatron_ct.cli import record_exit_status

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 4
HANG_FLOOR_S = 300.0
HANG_FACTOR = 10.0
LEARN_STEPS = 3
EXIT_GRACE_S = 2.0
"""Seconds between a rank's dump and its exit. The other ranks waiting in the same collective
reach their own timeout within a poll (at most 1 s) of this one; on gloo this rank's exit would
break their collective at once, and they would end with an error instead of with their stacks."""


class Watchdog:
    """One per rank. ``arm(iteration)`` at a step's start, ``disarm()`` at its end (after the
    step's log line and preemption check, both collective), ``paused()`` around evaluations
    and saves inside it."""

    def __init__(self, rank: int, dump_dir: str | None, timeout_s: float | None = None) -> None:
        self.rank = rank
        self.dump_dir = dump_dir
        self.fixed = timeout_s
        self._slowest = 0.0
        self._steps = 0
        self._armed_at: float | None = None
        self._iteration = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="megatron-ct-watchdog", daemon=True)
        self._thread.start()

    @property
    def timeout_s(self) -> float:
        if self.fixed is not None:
            return self.fixed
        if self._steps < LEARN_STEPS:
            return HANG_FLOOR_S
        return max(HANG_FLOOR_S, HANG_FACTOR * self._slowest)

    def arm(self, iteration: int) -> None:
        with self._lock:
            self._armed_at, self._iteration = time.monotonic(), iteration

    def disarm(self) -> None:
        with self._lock:
            if self._armed_at is not None:
                self._slowest = max(self._slowest, time.monotonic() - self._armed_at)
                self._steps += 1
            self._armed_at = None

    @contextlib.contextmanager
    def paused(self):
        """Not a step (an evaluation, a save): the clock stops, and restarts afterwards."""
        with self._lock:
            iteration, armed = self._iteration, self._armed_at is not None
            self._armed_at = None
        try:
            yield
        finally:
            if armed:
                with self._lock:
                    self._armed_at, self._iteration = time.monotonic(), iteration

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, max(self.timeout_s / 20, 0.05))):
            with self._lock:
                armed, iteration, timeout = self._armed_at, self._iteration, self.timeout_s
            if armed is not None and time.monotonic() - armed > timeout:
                self._fire(iteration, timeout)

    def _fire(self, iteration: int, timeout: float) -> None:
        where = "stderr"
        header = f"rank {self.rank}: iteration {iteration} has not finished after {timeout:.0f} s (hang)\n"
        try:
            if self.dump_dir:
                folder = os.path.join(self.dump_dir, "hang")
                os.makedirs(folder, exist_ok=True)
                where = os.path.join(folder, f"iter{iteration}_rank{self.rank}.txt")
                # Atomic: a peer's exit or SIGKILL during the dump leaves no file or a whole one.
                with atomic_write(where) as f:
                    f.write(header)
                    f.flush()  # faulthandler writes to the descriptor, after this text
                    faulthandler.dump_traceback(f, all_threads=True)
            else:
                sys.stderr.write(header)
                faulthandler.dump_traceback(sys.stderr, all_threads=True)
        finally:
            sys.stderr.write(
                f"error: hang (rank {self.rank}, iteration {iteration}): no progress for {timeout:.0f} s, "
                f"expected a step to finish; Python stacks in {where}; exiting {HANG_EXIT_CODE} to be "
                "requeued and resumed from the last checkpoint\n"
            )
            sys.stderr.flush()
            record_exit_status(HANG_EXIT_CODE)
            time.sleep(EXIT_GRACE_S)  # a peer's exit in the meantime ends this process with its error
            os._exit(HANG_EXIT_CODE)
