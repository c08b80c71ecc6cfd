"""Training batches from a multi-stage curriculum over named indexed datasets.

Step k takes global samples ``[c + (k - r) * G, ... + G)`` (as for every source, see
:mod:`megatron_ct.data.batches`); the stages come from the run's one
:class:`~megatron_ct.config.schedule.Schedule`. Each global sample is assigned to a dataset by the stage's
interleave (:mod:`megatron_ct.data.interleave`), then read at that dataset's current stream
position (:mod:`megatron_ct.data.stream`), which advances. So:

- the batch at step k is a pure function of (seed, schedule, k) for a run from scratch;
- the *data state*, per-dataset positions plus the interleave segment, goes into every
  checkpoint (``state_dict``); resuming restores it, so a resumed run makes exactly the
  batches of an uninterrupted one;
- when the schedule was edited (future stages, or the current stage's weights or length),
  the rest of the current stage starts a new interleave segment from the resume point with
  the new weights, and every dataset continues at its saved position: no sample already
  consumed is seen again and none is skipped;
- a stage's sequence length (``Stage.seq_length``) is only the window cut from each stream
  at its position: a stage at another length continues every dataset where the stage before
  stopped, in windows of the new length (and by_source packs of it), on resume too.

Every rank computes the whole step's assignment (cheap) and reads only its own samples.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from megatron_ct.config import DataConfig, Layout
from megatron_ct.config.schedule import Schedule, Stage
from megatron_ct.data.batches import SamplePosition, sample_indices, to_device
from megatron_ct.data.index_cache import IndexCache, rank0_first
from megatron_ct.data.interleave import Segment, StageWindow
from megatron_ct.data.packing import PackingOptions, build_batch
from megatron_ct.data.stream import DocumentStream
from megatron_ct.jsonl import JsonlLog

log = logging.getLogger("megatron_ct")

STATE_VERSION = 2  # 2: the sample position is part of the state (next_step, consumed_samples)


@dataclass(frozen=True)
class SampleRef:
    """Where one global sample comes from."""

    dataset: int  # index into the schedule's names
    position: int  # stream position of its first token
    length: int  # tokens (the stage's seq_length + 1, or fewer for by_source)
    next_position: int  # the dataset's position after it (concat windows overlap by one token)


def open_streams(data: DataConfig, names: list[str], seed: int, cache: IndexCache) -> dict[str, DocumentStream]:
    return {
        name: DocumentStream(
            name,
            data.datasets[name],
            key=f"data.datasets.{name}",
            seed=seed,
            cache=cache,
            data_root=data.data_root,
        )
        for name in names
    }


def build_indices(schedule: Schedule, streams: dict[str, DocumentStream]) -> None:
    """Epoch-0 index of every dataset (and by_source packs at each length a stage packs it so)."""
    by_source = {
        (n, st.seq_length) for st in schedule.stages if st.packing == "by_source" for n in _stage_datasets(st, schedule)
    }
    last_report = time.perf_counter()
    for i, (name, stream) in enumerate(streams.items()):
        t0 = time.perf_counter()
        stream.epoch_index(0)
        for seq_length in sorted(seq for n, seq in by_source if n == name):
            stream.pack_bounds(0, seq_length)
        now = time.perf_counter()
        if now - t0 > 2.0:
            log.info("data: index of %r (%s documents) ready in %.1fs", name, f"{stream.num_docs:,}", now - t0)
        elif now - last_report > 10.0:
            log.info("data: indices of %d/%d datasets ready", i + 1, len(streams))
        else:
            continue
        last_report = now


def length_edges(seq_length: int, min_tokens: int | None = None) -> list[int]:
    """Bucket starts of the length histogram: quarters of the sequence length and the
    up-sampling threshold."""
    edges = {max(1, seq_length // 4), max(1, seq_length // 2), seq_length}
    if min_tokens is not None:
        edges.add(min_tokens)
    return sorted(edges)


def describe_lengths(name: str, stream: DocumentStream, seq_length: int) -> str:
    """One line: the token share per document-length bucket, once per document -> per epoch."""
    up = stream.upsample or {}
    edges = length_edges(seq_length, up.get("min_tokens"))
    hist = stream.length_histogram(edges)
    labels = [f"<{edges[0]}"] + [f"{a}-{b}" for a, b in zip(edges, edges[1:], strict=False)] + [f">={edges[-1]}"]
    parts = [
        f"{label} {100 * a:.0f}%->{100 * b:.0f}%"
        for label, a, b in zip(labels, hist["natural"], hist["epoch"], strict=True)
    ]
    what = f"documents >= {up['min_tokens']} tokens x{up['factor']}" if up else "no up-sampling"
    return f"dataset {name!r} token share by document length ({what}): " + ", ".join(parts)


def _stage_datasets(stage: Stage, schedule: Schedule) -> list[str]:
    used = (stage.start_weights > 0) | (stage.end_weights > 0)
    return [n for n, u in zip(schedule.names, used, strict=True) if u]


class CurriculumSource:
    """Yields this rank's micro-batches of each step; holds the data state (a DataSource)."""

    def __init__(
        self,
        data: DataConfig,
        schedule: Schedule,
        layout: Layout,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        dp_rank: int,
        cache: IndexCache | None = None,
        log_dir: str | None = None,
    ) -> None:
        self.mbs, self.dp, self.dp_rank = micro_batch_size, layout.dims.dp, dp_rank
        self.num_microbatches = layout.num_microbatches
        self.device = layout.device
        self.schedule = schedule
        self.names = schedule.names
        self.position = SamplePosition(global_batch_size)
        self.cache = cache or IndexCache(data.index_cache_dir)
        t0 = time.perf_counter()
        self.streams = open_streams(data, self.names, seed, self.cache)
        rank0_first(lambda: build_indices(schedule, self.streams))
        log.info(
            "data: %d datasets, %s tokens per epoch; indices ready in %.1fs (%d built, %d from cache)",
            len(self.streams),
            f"{sum(s.tokens_per_epoch for s in self.streams.values()):,}",
            time.perf_counter() - t0,
            self.cache.built,
            self.cache.loaded,
        )
        for name, stream in self.streams.items():
            if stream.upsample is not None:
                log.info("data: %s", describe_lengths(name, stream, data.seq_length))
        self.positions = dict.fromkeys(self.names, 0)
        self.samples_taken = dict.fromkeys(self.names, 0)
        self.segment: Segment | None = None
        wanted = data.log_samples and log_dir and _is_rank0()
        self._sample_log = JsonlLog(os.path.join(log_dir, "samples.jsonl")) if wanted else None

    def window(self, stage: Stage) -> StageWindow:
        """``stage`` placed in the sample stream, counted from the current anchor (so a job chunk
        that changed the global batch size keeps stage boundaries at the same iterations)."""
        num = None if stage.iters is None else stage.iters * self.position.global_batch
        return StageWindow(stage, self.position.first_sample(stage.start_iter), num)

    # --- checkpointed data state ---------------------------------------------------------
    def state_dict(self) -> dict:
        seg = self.segment
        return {
            "kind": "curriculum",
            "version": STATE_VERSION,
            **self.position.state_dict(),
            "datasets": {
                n: {"position": int(p), "samples": int(self.samples_taken.get(n, 0)), "fingerprint": _fp(self, n)}
                for n, p in self.positions.items()
            },
            "segment": None
            if seg is None
            else {
                "stage": seg.window.stage.name,
                "signature": seg.window.signature(),
                "start_sample": seg.start_sample,
                "counts": {n: int(c) for n, c in zip(self.names, seg.counts, strict=True)},
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (a checkpoint's data state) stopped. Without per-dataset
        positions (a checkpoint from before they were saved) the schedule is replayed."""
        self.position.load_state_dict(state)
        step = self.position.next_step
        self.segment = None
        if "datasets" not in state:
            if step > 0:
                log.warning("checkpoint has no curriculum data state: replaying the schedule for %d steps", step)
                self._replay_to(step, self.position.anchor_samples)
            return
        for name, entry in state["datasets"].items():
            # Datasets no stage uses now keep their position in the state for a later edit.
            self.positions[name] = int(entry["position"])
            self.samples_taken[name] = int(entry.get("samples", 0))
            fp = entry.get("fingerprint")
            if name in self.streams and fp and fp != self.streams[name].fingerprint:
                changed = ", ".join(self.streams[name].prefixes)
                log.warning("dataset %r: files differ from the checkpoint's (%s); position kept as is", name, changed)
        seg = state.get("segment")
        window = self.window(self.schedule.stage_at(step))
        if seg and seg["stage"] == window.stage.name and seg["signature"] == window.signature():
            counts = np.array([seg["counts"].get(n, 0) for n in self.names], dtype=np.float64)
            self.segment = Segment(window, int(seg["start_sample"]), counts)
        elif seg:
            log.info(
                "data: stage %r differs from the checkpoint's schedule (or the run moved past it); its rest "
                "interleaves with the new weights from sample %d, every dataset continuing where it stopped",
                window.stage.name,
                self.position.consumed_samples,
            )

    def _replay_to(self, step: int, consumed_samples: int) -> None:
        self.position = SamplePosition(self.position.global_batch)
        for _ in range(step):
            self.plan()
        self.position.load_state_dict({"next_step": step, "consumed_samples": consumed_samples})

    def progress(self) -> dict:
        return {"consumed_samples": self.position.consumed_samples}

    # --- one step -------------------------------------------------------------------------
    def plan(self) -> tuple[StageWindow, int, list[SampleRef]]:
        """Assign the next step's global samples and advance the data state:
        (its stage window, its first global sample, where each sample comes from)."""
        step = self.position.next_step
        window = self.window(self.schedule.stage_at(step))
        first = self.position.first_sample(step)
        seg = self.segment
        if seg is None or seg.window.stage is not window.stage or seg.cursor != first:
            self.segment = seg = Segment(window, first)
        ids = seg.take(self.position.global_batch)
        packing, seq_length = window.stage.packing, window.stage.seq_length
        refs = []
        for i in ids.tolist():
            name = self.names[i]
            stream, pos = self.streams[name], self.positions[name]
            length, advance = stream.sample_span(pos, packing, seq_length)
            refs.append(SampleRef(i, pos, length, pos + advance))
            self.positions[name] = pos + advance
            self.samples_taken[name] += 1
        self.position.next_step = step + 1
        return window, first, refs

    def next_batch(self) -> Iterator[dict[str, torch.Tensor]]:
        step = self.position.next_step
        window, _, refs = self.plan()
        stage = window.stage
        if self._sample_log is not None:
            # [dataset, stream position, position after]: each dataset's samples tile its stream.
            samples = [[self.names[r.dataset], r.position, r.next_position] for r in refs]
            self._sample_log.write({"iteration": step + 1, "stage": stage.name, "samples": samples})
        options = PackingOptions(stage.reset_position_ids, stage.reset_attention_mask, stage.eod_mask_loss)
        return self._batches(refs, stage.seq_length, options)

    def _batches(
        self, refs: list[SampleRef], seq_length: int, options: PackingOptions
    ) -> Iterator[dict[str, torch.Tensor]]:
        for j in range(self.num_microbatches):
            windows = []
            for i in sample_indices(0, j, self.dp_rank, self.mbs, self.dp):
                r = refs[i]
                windows.append(self.streams[self.names[r.dataset]].read(r.position, r.length))
            yield to_device(build_batch(windows, seq_length, options), self.device)

    def close(self) -> None:
        if self._sample_log is not None:
            self._sample_log.close()


def _fp(source: CurriculumSource, name: str) -> str | None:
    stream = source.streams.get(name)
    return stream.fingerprint if stream else None


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
