"""Training batches from a multi-stage curriculum over named indexed datasets.

Step k takes global samples ``[c + (k - r) * G, ... + G)`` (as for every source, see
:mod:`megatron_ct.data.batches`). Each global sample is assigned to a dataset by the stage's
interleave (:mod:`megatron_ct.data.interleave`), then read at that dataset's current stream
position (:mod:`megatron_ct.data.stream`), which advances. So:

- the batch at step k is a pure function of (seed, schedule, k) for a run from scratch;
- the *data state*, per-dataset positions plus the interleave segment, goes into every
  checkpoint (``state_dict``); resuming restores it, so a resumed run makes exactly the
  batches of an uninterrupted one;
- when the schedule was edited (future stages, or the current stage's weights or length),
  the rest of the current stage starts a new interleave segment from the resume point with
  the new weights, and every dataset continues at its saved position: no sample already
  consumed is seen again and none is skipped.

Every rank computes the whole step's assignment (cheap) and reads only its own samples.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from megatron_ct.config import CTConfig, Layout
from megatron_ct.data.batches import sample_indices
from megatron_ct.data.index_cache import IndexCache, rank0_first
from megatron_ct.data.interleave import Segment
from megatron_ct.data.packing import PackingOptions, build_batch
from megatron_ct.data.schedule import Schedule, Stage
from megatron_ct.data.stream import DocumentStream

log = logging.getLogger("megatron_ct")

STATE_VERSION = 1


@dataclass(frozen=True)
class SampleRef:
    """Where one global sample comes from."""

    dataset: int  # index into the schedule's names
    position: int  # stream position of its first token
    length: int  # tokens (seq_length + 1, or fewer for by_source)
    next_position: int  # the dataset's position after it (concat windows overlap by one token)


def open_streams(cfg: CTConfig, names: list[str], cache: IndexCache) -> dict[str, DocumentStream]:
    d = cfg.data
    return {
        name: DocumentStream(
            name,
            d.datasets[name],
            key=f"data.datasets.{name}",
            seed=cfg.train.seed,
            seq_length=d.seq_length,
            cache=cache,
            data_root=d.data_root,
        )
        for name in names
    }


def build_indices(schedule: Schedule, streams: dict[str, DocumentStream]) -> None:
    """Epoch-0 index of every dataset (and by_source packs where a stage packs that way)."""
    by_source = {n for st in schedule.stages if st.packing == "by_source" for n in _stage_datasets(st, schedule)}
    last_report = time.perf_counter()
    for i, (name, stream) in enumerate(streams.items()):
        t0 = time.perf_counter()
        stream.epoch_index(0)
        if name in by_source:
            stream.pack_bounds(0)
        now = time.perf_counter()
        if now - t0 > 2.0:
            log.info("data: index of %r (%s documents) ready in %.1fs", name, f"{stream.num_docs:,}", now - t0)
        elif now - last_report > 10.0:
            log.info("data: indices of %d/%d datasets ready", i + 1, len(streams))
        else:
            continue
        last_report = now


def _stage_datasets(stage: Stage, schedule: Schedule) -> list[str]:
    used = (stage.start_weights > 0) | (stage.end_weights > 0)
    return [n for n, u in zip(schedule.names, used, strict=True) if u]


class CurriculumSource:
    """Yields this rank's micro-batches of each step; holds the data state."""

    def __init__(self, cfg: CTConfig, layout: Layout, dp_rank: int, device: str, log_dir: str | None = None) -> None:
        d, t = cfg.data, cfg.train
        self.seq_length = d.seq_length
        self.global_batch = t.global_batch_size
        self.mbs, self.dp, self.dp_rank = t.micro_batch_size, layout.dp, dp_rank
        self.num_microbatches = layout.num_microbatches
        self.device = device
        self.data_cfg = d
        self.schedule = Schedule(d, self.global_batch)
        self.cache = IndexCache(d.index_cache_dir)
        t0 = time.perf_counter()
        self.streams = _open_and_index(cfg, self.schedule, self.cache)
        check_token_ids(self.streams, cfg.model.vocab_size, "data.datasets")
        log.info(
            "data: %d datasets, %s tokens per epoch; indices ready in %.1fs (%d built, %d from cache)",
            len(self.streams),
            f"{sum(s.tokens_per_epoch for s in self.streams.values()):,}",
            time.perf_counter() - t0,
            self.cache.built,
            self.cache.loaded,
        )
        self.positions = dict.fromkeys(self.schedule.names, 0)
        self.samples_taken = dict.fromkeys(self.schedule.names, 0)
        self.segment: Segment | None = None
        self.resumed_step, self.resumed_samples = 0, 0
        self.next_step = 0
        self._sample_log = None
        if d.log_samples and log_dir and _is_rank0():
            os.makedirs(log_dir, exist_ok=True)
            self._sample_log = open(os.path.join(log_dir, "samples.jsonl"), "a", buffering=1)

    # --- positions in the global sample stream ------------------------------------------
    def consumed_samples(self, step: int) -> int:
        return self.resumed_samples + (step - self.resumed_step) * self.global_batch

    # --- checkpointed data state ---------------------------------------------------------
    def state_dict(self) -> dict:
        seg = self.segment
        return {
            "version": STATE_VERSION,
            "next_step": self.next_step,
            "consumed_samples": self.consumed_samples(self.next_step),
            "datasets": {
                n: {"position": int(p), "samples": int(self.samples_taken.get(n, 0)), "fingerprint": _fp(self, n)}
                for n, p in self.positions.items()
            },
            "segment": None
            if seg is None
            else {
                "stage": seg.stage.name,
                "signature": seg.stage.signature(),
                "start_sample": seg.start_sample,
                "counts": {n: int(c) for n, c in zip(self.schedule.names, seg.counts, strict=True)},
            },
        }

    def resume(self, step: int, consumed_samples: int, state: dict | None = None) -> None:
        """Continue at ``step`` after ``consumed_samples``; ``state`` is the checkpoint's data
        state (None: replay the schedule from the start to rebuild it)."""
        self.resumed_step, self.resumed_samples = step, consumed_samples
        self.schedule = Schedule(self.data_cfg, self.global_batch, step, consumed_samples)
        self.next_step = step
        self.segment = None
        if state is None:
            if step > 0:
                log.warning("checkpoint has no curriculum data state: replaying the schedule for %d steps", step)
                self._replay_to(step, consumed_samples)
            return
        if state.get("next_step", step) != step:
            log.warning("checkpoint data state is for step %s, resuming at step %d", state.get("next_step"), step)
        saved = state.get("datasets", {})
        for name, entry in saved.items():
            # Datasets no stage uses now keep their position in the state for a later edit.
            self.positions[name] = int(entry["position"])
            self.samples_taken[name] = int(entry.get("samples", 0))
            fp = entry.get("fingerprint")
            if name in self.streams and fp and fp != self.streams[name].fingerprint:
                log.warning("dataset %r: files differ from the checkpoint's; its position is kept as is", name)
        seg = state.get("segment")
        stage = self.schedule.stage_at(step)
        if seg and seg["stage"] == stage.name and seg["signature"] == stage.signature():
            counts = np.array([seg["counts"].get(n, 0) for n in self.schedule.names], dtype=np.float64)
            self.segment = Segment(stage, int(seg["start_sample"]), counts)
        elif seg:
            log.info(
                "data: stage %r differs from the checkpoint's schedule (or the run moved past it); its rest "
                "interleaves with the new weights from sample %d, every dataset continuing where it stopped",
                stage.name,
                consumed_samples,
            )

    def _replay_to(self, step: int, consumed_samples: int) -> None:
        self.resumed_step, self.resumed_samples, self.next_step = 0, 0, 0
        self.schedule = Schedule(self.data_cfg, self.global_batch)
        for k in range(step):
            self.plan(k)
        self.resumed_step, self.resumed_samples = step, consumed_samples

    # --- one step -------------------------------------------------------------------------
    def plan(self, step: int) -> tuple[Stage, list[SampleRef]]:
        """Assign the step's global samples and advance the data state (call once per step, in order)."""
        if step != self.next_step:
            raise RuntimeError(
                f"curriculum data: step {step} requested, expected {self.next_step} (steps run in order)"
            )
        stage = self.schedule.stage_at(step)
        first = self.consumed_samples(step)
        if self.segment is None or self.segment.stage is not stage or self.segment.cursor != first:
            self.segment = Segment(stage, first)
        ids = self.segment.take(self.global_batch)
        refs = []
        for i in ids.tolist():
            name = self.schedule.names[i]
            stream, pos = self.streams[name], self.positions[name]
            length, advance = stream.sample_span(pos, stage.packing)
            refs.append(SampleRef(i, pos, length, pos + advance))
            self.positions[name] = pos + advance
            self.samples_taken[name] += 1
        self.next_step = step + 1
        return stage, refs

    def microbatches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        stage, refs = self.plan(step)
        if self._sample_log is not None:
            # [dataset, stream position, position after]: each dataset's samples tile its stream.
            samples = [[self.schedule.names[r.dataset], r.position, r.next_position] for r in refs]
            self._sample_log.write(json.dumps({"iteration": step + 1, "stage": stage.name, "samples": samples}) + "\n")
        options = PackingOptions(stage.reset_position_ids, stage.reset_attention_mask, stage.eod_mask_loss)
        return self._batches(refs, options)

    def _batches(self, refs: list[SampleRef], options: PackingOptions) -> Iterator[dict[str, torch.Tensor]]:
        for j in range(self.num_microbatches):
            windows = []
            for i in sample_indices(0, j, self.dp_rank, self.mbs, self.dp):
                r = refs[i]
                windows.append(self.streams[self.schedule.names[r.dataset]].read(r.position, r.length))
            yield build_batch(windows, self.seq_length, options, self.device)

    def close(self) -> None:
        if self._sample_log is not None:
            self._sample_log.close()
            self._sample_log = None


def _fp(source: CurriculumSource, name: str) -> str | None:
    stream = source.streams.get(name)
    return stream.fingerprint if stream else None


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _open_and_index(cfg: CTConfig, schedule: Schedule, cache: IndexCache) -> dict[str, DocumentStream]:
    """Open every dataset and make its epoch-0 index (rank 0 first: the others read its cache)."""
    streams = open_streams(cfg, schedule.names, cache)
    rank0_first(lambda: build_indices(schedule, streams))
    return streams


def check_token_ids(streams: dict[str, DocumentStream], vocab_size: int, key: str) -> None:
    """Every token id must index the model's vocabulary: a dataset tokenized with another
    (larger) tokenizer is a one-line error here, not an index error inside a kernel."""
    from megatron_ct.config import ConfigError

    for name, stream in streams.items():
        top, prefix = stream.max_token_id()
        if top >= vocab_size:
            raise ConfigError(
                f"{key}.{name}: token id {top} in {prefix} does not fit model.vocab_size={vocab_size} "
                f"(expected ids < {vocab_size}; tokenized with a different tokenizer?)"
            )


def check_data_options(cfg: CTConfig, device: str) -> None:
    """Data options that need the run's context (ConfigError naming the key):

    - ``data.tokenizer`` must fit in ``model.vocab_size``;
    - document attention masks need an attention backend that applies them: local, sdpa or
      flex (megatron_ct/model/attention.py). Transformer Engine's causal attention ignores them.
    """
    from megatron_ct.config import ConfigError
    from megatron_ct.model.attention import choose_attention_backend
    from megatron_ct.model.llama import choose_transformer_impl

    d = cfg.data
    if d.tokenizer and d.source == "indexed":
        from megatron_ct.tokenizer import load_tokenizer

        try:
            vocab = load_tokenizer(d.tokenizer).vocab_size
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.tokenizer: {exc}") from None
        if vocab > cfg.model.vocab_size:
            raise ConfigError(
                f"data.tokenizer: expected at most model.vocab_size={cfg.model.vocab_size} ids, got a tokenizer "
                f"with {vocab} ({d.tokenizer})"
            )
    if not d.uses_document_attention_mask:
        return
    impl = choose_transformer_impl(cfg.model.transformer_impl, device)
    attention = choose_attention_backend(cfg.model.attention_backend, impl, device, document_masks=True)
    if attention == "te":
        i = next(i for i, s in enumerate(d.stages) if s.reset_attention_mask)
        raise ConfigError(
            f"data.stages[{i}].reset_attention_mask: needs model.attention_backend flex, sdpa or local (they apply "
            f"document masks; Transformer Engine's causal attention ignores them), got {attention}"
        )
