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
slowest step seen so far, at least ``HANG_FLOOR_S``. Evaluations and checkpoint saves are
sections of their own (:meth:`Watchdog.section`): the step's clock stops for them, and they are
watched with their own timeouts, ``train.eval_hang_timeout_s`` and ``train.save_hang_timeout_s``
or learned the same way (``HANG_FACTOR`` times the slowest one so far, at least
``SECTION_FLOOR_S``: a first save of a large model may take minutes). The process-group
timeout (``parallel.distributed_timeout_minutes``) bounds a collective in any of them, but not
a rank stuck outside one (a hung file system during a save): the others then wait for it in the
next collective, and are the ones whose watchdogs fire. A rank that is itself stopped
(SIGSTOP, a frozen host) cannot write its stack; its peers' dumps and their common iteration
say which rank never arrived.

Each dump also names the last collective the rank entered, as its own line ``last collective:
{json}`` (op, the group's ranks, tensor dtypes and shapes, seconds since it was entered,
whether it returned): :func:`trace_collectives` wraps ``torch.distributed``'s collective
functions (the module attributes megatron-core and our code call) with a wrapper that stores
one record per call, metadata only (no device sync, the same on CPU and GPU). The entry point
installs it before megatron-core is imported, because megatron-core binds some of them to its
own names at import (the sequence-parallel all-gather and reduce-scatter, the distributed
optimizer's bucket reduce-scatter and all-gather); installed later (a trainer started in an
already-running process) those calls are not recorded. An asynchronous collective (``async_op``,
``isend``, ``batch_isend_irecv``) has "returned" once issued: its completion is awaited through
its handle, which is not traced (the stack shows that wait).
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import inspect
import json
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
SECTION_FLOOR_S = 1800.0
"""The least timeout of an evaluation or a save that none was configured for."""
EXIT_GRACE_S = 2.0
"""Seconds between a rank's dump and its exit. The other ranks waiting in the same collective
reach their own timeout within a poll (at most 1 s) of this one; on gloo this rank's exit would
break their collective at once, and they would end with an error instead of with their stacks."""


COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "monitored_barrier",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)
"""The ``torch.distributed`` functions :func:`trace_collectives` wraps (those this torch has)."""
_ALWAYS_ASYNC = ("isend", "irecv", "batch_isend_irecv")


class _Entered:
    """One collective call as it was entered: metadata only (tensors are not kept alive)."""

    __slots__ = ("op", "group", "tensors", "at", "returned", "async_op", "thread")

    def __init__(self, op: str, group, tensors: list, async_op: bool) -> None:
        self.op, self.group, self.tensors, self.async_op = op, group, tensors, async_op
        self.at = time.monotonic()
        self.returned = False
        self.thread = threading.current_thread()


_last: _Entered | None = None


def _traced(op: str, fn, tensor_type: type):
    params = list(inspect.signature(fn).parameters)
    group_at = params.index("group") if "group" in params else None
    async_at = params.index("async_op") if "async_op" in params else None
    always_async = op in _ALWAYS_ASYNC

    def tensors(values) -> list:
        # (dtype, shape, count) of the tensors and lists of tensors; formatted only in a dump.
        out = []
        for v in values:
            if isinstance(v, tensor_type):
                out.append((v.dtype, v.shape, 1))
            elif isinstance(v, list) and v and isinstance(v[0], tensor_type):
                out.append((v[0].dtype, v[0].shape, len(v)))
        return out

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        global _last
        if op == "batch_isend_irecv":  # a list of P2POp, each with its tensor and group
            ops = args[0] if args else kwargs.get("p2p_op_list", [])
            group = ops[0].group if ops else None
            found = tensors([[o.tensor for o in ops]]) if ops else []
        else:
            group = args[group_at] if group_at is not None and len(args) > group_at else kwargs.get("group")
            found = tensors(args)
            if kwargs:
                found += tensors(kwargs.values())
        asynchronous = always_async or bool(
            args[async_at] if async_at is not None and len(args) > async_at else kwargs.get("async_op")
        )
        entered = _last = _Entered(op, group, found, asynchronous)
        result = fn(*args, **kwargs)
        entered.returned = True
        return result

    traced.megatron_ct_untraced = fn
    return traced


def trace_collectives() -> None:
    """Wrap ``torch.distributed``'s collectives so that :func:`last_collective` can tell the
    last one this process entered. Call before megatron-core is imported (module notes);
    idempotent."""
    import torch
    import torch.distributed as dist

    for op in COLLECTIVES:
        fn = getattr(dist, op, None)
        if fn is not None and not hasattr(fn, "megatron_ct_untraced"):
            setattr(dist, op, _traced(op, fn, torch.Tensor))


def last_collective() -> dict | None:
    """The last collective this process entered (None: none since :func:`trace_collectives`):
    ``op``, ``group_ranks`` (global ranks) and ``group_size``, ``tensors`` (``dtype[shape]``,
    ``N x`` for a list), ``entered_s_ago``, ``returned`` (an asynchronous one: issued),
    ``async_op`` and the calling ``thread``."""
    entered = _last
    if entered is None:
        return None
    try:
        import torch.distributed as dist

        ranks = dist.get_process_group_ranks(entered.group if entered.group is not None else dist.group.WORLD)
    except Exception:  # a destroyed group, no default group: the rest still says what it was
        ranks = None
    return {
        "op": entered.op,
        "group_ranks": ranks,
        "group_size": len(ranks) if ranks is not None else None,
        "tensors": [
            f"{n} x " * (n > 1) + f"{str(dtype).removeprefix('torch.')}{list(shape)}"
            for dtype, shape, n in entered.tensors
        ],
        "entered_s_ago": round(time.monotonic() - entered.at, 3),
        "returned": entered.returned,
        "async_op": entered.async_op,
        "thread": entered.thread.name,
    }


def describe(record: dict | None) -> str:
    """``record`` (from :func:`last_collective`) in a few words, for the one-line error."""
    if record is None:
        return "none traced"
    state = "returned" if record["returned"] else "not returned"
    return f"{record['op']} over {record['group_size']} ranks, entered {record['entered_s_ago']:.1f} s ago, {state}"


class Watchdog:
    """One per rank. ``arm(iteration)`` at a step's start, ``disarm()`` at its end (after the
    step's log line and preemption check, both collective), ``section(name, iteration)`` around
    an evaluation or a save, inside a step or not. ``timeout_s``: the step's (None: learned);
    ``section_timeouts``: ``{name: seconds or None}``."""

    def __init__(
        self,
        rank: int,
        dump_dir: str | None,
        timeout_s: float | None = None,
        section_timeouts: dict[str, float | None] | None = None,
    ) -> None:
        self.rank = rank
        self.dump_dir = dump_dir
        self.fixed = {**(section_timeouts or {}), "step": timeout_s}
        self._slowest: dict[str, float] = {}
        self._steps = 0
        self._armed_at: float | None = None
        self._iteration = 0
        self._section = "step"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        trace_collectives()  # the entry point did so earlier already (module notes)
        self._thread = threading.Thread(target=self._watch, name="megatron-ct-watchdog", daemon=True)
        self._thread.start()

    @property
    def timeout_s(self) -> float:
        """A training step's timeout now."""
        return self.timeout_for("step")

    def timeout_for(self, section: str) -> float:
        if self.fixed.get(section) is not None:
            return self.fixed[section]
        slowest = HANG_FACTOR * self._slowest.get(section, 0.0)
        if section != "step":
            return max(SECTION_FLOOR_S, slowest)
        return HANG_FLOOR_S if self._steps < LEARN_STEPS else max(HANG_FLOOR_S, slowest)

    def _took(self, section: str, seconds: float) -> None:
        self._slowest[section] = max(self._slowest.get(section, 0.0), seconds)

    def arm(self, iteration: int) -> None:
        with self._lock:
            self._armed_at, self._iteration, self._section = time.monotonic(), iteration, "step"

    def disarm(self) -> None:
        with self._lock:
            if self._armed_at is not None:
                self._took("step", time.monotonic() - self._armed_at)
                self._steps += 1
            self._armed_at = None

    @contextlib.contextmanager
    def section(self, name: str, iteration: int):
        """An evaluation or a save after ``iteration``, watched with its own timeout; a step's
        clock stops meanwhile and restarts afterwards."""
        with self._lock:
            outer = self._armed_at, self._iteration, self._section
            self._armed_at, self._iteration, self._section = time.monotonic(), iteration, name
        try:
            yield
            with self._lock:
                self._took(name, time.monotonic() - self._armed_at)
        finally:
            with self._lock:
                armed, self._iteration, self._section = outer
                self._armed_at = None if armed is None else time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = 0.05
        while not self._stop.wait(poll):
            with self._lock:
                armed, iteration, section = self._armed_at, self._iteration, self._section
                timeout = self.timeout_for(section)
            poll = min(1.0, max(timeout / 20, 0.05))
            if armed is not None and time.monotonic() - armed > timeout:
                self._fire(iteration, section, timeout)

    def _fire(self, iteration: int, section: str, timeout: float) -> None:
        where = "stderr"
        collective = last_collective()
        step = section == "step"
        what = f"iteration {iteration}" if step else f"the {section} after iteration {iteration}"
        header = (
            f"rank {self.rank}: {what} has not finished after {timeout:.0f} s (hang)\n"
            f"last collective: {json.dumps(collective)}\n"
        )
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
                f"error: hang (rank {self.rank}, iteration {iteration}{'' if step else ', ' + section}): "
                f"no progress for {timeout:.0f} s, expected {'a step' if step else 'the ' + section} to finish; "
                f"last collective: {describe(collective)}; Python stacks in {where}; "
                f"exiting {HANG_EXIT_CODE} to be requeued and resumed from the last checkpoint\n"
            )
            sys.stderr.flush()
            record_exit_status(HANG_EXIT_CODE)
            time.sleep(EXIT_GRACE_S)  # a peer's exit in the meantime ends this process with its error
            _end_children()
            os._exit(HANG_EXIT_CODE)


def _end_children() -> None:
    """SIGKILL this process's multiprocessing children: megatron-core's checkpoint manager and
    writers. ``os._exit`` skips the exit handlers that would stop them, and they ignore SIGTERM
    (checkpoint/preemption.py), so they would outlive the job's trainers (on SLURM, until the
    step's cleanup; elsewhere for ever, holding the launcher's pipes open). A save they were
    writing is incomplete either way: never published, the last complete checkpoint resumes."""
    import multiprocessing

    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.kill()
