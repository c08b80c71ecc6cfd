"""Per-rank step timing and the straggler report.

In a synchronous job every rank's step takes the same wall time: a slow rank makes the others
wait in the gradient all-reduce. What differs is each rank's own work before it reaches that
collective. :class:`StepTimer` measures per step, on every rank:

- ``compute``: from the step's start to the end-of-step gradient finalisation (the DP / CP
  all-reduce): forward and backward, waits for data included (and, under pipeline parallelism,
  the waits for the neighbouring stages). Host time on CPU; CUDA events on GPU, so the figure
  is the device's and no host sync is added;
- ``data_wait``: time spent getting the step's micro-batches from the data source.

On log steps (which already synchronise with the host) the means since the last log step are
all-gathered. Rank 0 writes them to ``ranks.jsonl`` in the log directory, one line per log step:
``{"iteration", "compute_s": [per rank], "data_wait_s": [per rank], "pp_stage": [per rank]}``.
The metrics record gets the median and the slowest rank. A rank whose compute time is more than
``logging.straggler_threshold`` above the median of the ranks of its pipeline stage gets a
one-line warning naming it and its host (ranks of different stages do different work, so they
are not compared).
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StepTimer:
    """One per rank; see the module docstring. Collective: :meth:`report` on every rank."""

    def __init__(self, device: torch.device, pp_stage: int, threshold: float | None) -> None:
        self.device = device
        self.threshold = threshold
        self.cuda = device.type == "cuda"
        self._compute = 0.0
        self._wait = 0.0
        self._steps = 0
        self._t0: float | None = None
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start_event = None
        world = dist.get_world_size() if dist.is_initialized() else 1
        gathered: list = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(gathered, (pp_stage, socket.gethostname()))
        else:
            gathered = [(pp_stage, socket.gethostname())]
        self.pp_stages = [g[0] for g in gathered]
        self.hosts = [g[1] for g in gathered]

    # --- per step ------------------------------------------------------------------------
    def step_start(self) -> None:
        self._t0 = time.perf_counter()
        if self.cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def compute_done(self) -> None:
        """Called where the gradients are finalised (before the DP all-reduce)."""
        if self._t0 is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start_event, end))
        else:
            self._compute += time.perf_counter() - self._t0
        self._t0 = None
        self._steps += 1

    def timed(self, batches: Iterator[dict]) -> Iterator[dict]:
        """The step's micro-batches, with the time spent getting each added to data wait."""
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self._wait += time.perf_counter() - t0
            yield batch

    # --- log steps -----------------------------------------------------------------------
    def report(self, iteration: int) -> dict | None:
        """Collective. Per-rank means since the last report; on rank 0 the ``ranks.jsonl``
        record plus the metrics fields, None elsewhere (and when no step was timed)."""
        if self.cuda:
            self._compute += sum(a.elapsed_time(b) for a, b in self._events) / 1e3  # ms -> s
            self._events.clear()
        steps = max(self._steps, 1)
        local = torch.tensor([self._compute / steps, self._wait / steps], dtype=torch.float64, device=self.device)
        self._compute = self._wait = 0.0
        self._steps = 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
        else:
            parts = [local]
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        compute = [float(p[0]) for p in parts]
        wait = [float(p[1]) for p in parts]
        slowest = max(range(len(compute)), key=compute.__getitem__)
        self._warn(iteration, compute)
        return {
            "ranks": {"iteration": iteration, "compute_s": compute, "data_wait_s": wait, "pp_stage": self.pp_stages},
            "metrics": {
                "compute_s_median": statistics.median(compute),
                "compute_s_max": compute[slowest],
                "slowest_rank": slowest,
                "data_wait_s_max": max(wait),
            },
        }

    def _warn(self, iteration: int, compute: list[float]) -> None:
        if not self.threshold:
            return
        for stage in sorted(set(self.pp_stages)):
            ranks = [r for r, s in enumerate(self.pp_stages) if s == stage]
            if len(ranks) < 2:
                continue
            median = statistics.median(compute[r] for r in ranks)
            for r in ranks:
                if median > 0 and compute[r] > (1 + self.threshold) * median:
                    log.warning(
                        "straggler: rank %d (%s, pipeline stage %d) computes %.0f%% slower than its stage's "
                        "median (%.3f s vs %.3f s per step, up to iteration %d; logging.straggler_threshold=%g)",
                        r,
                        self.hosts[r],
                        stage,
                        100 * (compute[r] / median - 1),
                        compute[r],
                        median,
                        iteration,
                        self.threshold,
                    )
