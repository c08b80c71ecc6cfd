"""The curriculum as numbers: each stage's steps, samples and blend vectors.

Stage lengths are steps (``iters``, or ``tokens`` rounded up to whole steps of
``global_batch_size * seq_length``), laid end to end from iteration 0; an open-ended last
stage runs to ``train.train_iters``. A step belongs wholly to one stage.

Samples are counted from an *anchor* ``(iteration, consumed samples)``: (0, 0) for a fresh
run, the checkpoint's values on resume, so a job chunk that changes the global batch size
keeps stage boundaries at the same iterations. Blends are vectors over ``names`` (every
dataset any stage uses, sorted), normalised to sum 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from megatron_ct.config.schema import DataConfig


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    start_iter: int
    end_iter: int | None  # exclusive; None: open-ended (runs to the end of training)
    start_sample: int
    num_samples: int | None  # None: open-ended
    start_weights: np.ndarray  # [len(names)], sums to 1
    end_weights: np.ndarray  # == start_weights without a ramp
    packing: str
    reset_position_ids: bool
    reset_attention_mask: bool
    eod_mask_loss: bool
    lr_rewarm_iters: int

    @property
    def ramped(self) -> bool:
        return not np.array_equal(self.start_weights, self.end_weights)

    def weights_at(self, sample: int) -> np.ndarray:
        """Scheduled weights at global sample index ``sample`` (its midpoint on the ramp)."""
        if not self.ramped:
            return self.start_weights
        t = (sample - self.start_sample + 0.5) / self.num_samples
        return self.start_weights + (self.end_weights - self.start_weights) * t

    def signature(self) -> str:
        """What the interleave of this stage depends on; a saved interleave state is reused on
        resume only when this is unchanged (else the stage's rest starts a fresh segment)."""
        return json.dumps(
            [self.name, self.start_sample, self.num_samples, self.start_weights.tolist(), self.end_weights.tolist()]
        )


def stage_iters(data: DataConfig, global_batch_size: int) -> list[int | None]:
    """Length of each stage in steps (None for an open-ended last stage)."""
    out: list[int | None] = []
    for s in data.stages:
        if s.iters is not None:
            out.append(s.iters)
        elif s.tokens is not None:
            out.append(math.ceil(s.tokens / (global_batch_size * data.seq_length)))
        else:
            out.append(None)
    return out


def dataset_names(data: DataConfig) -> list[str]:
    """Datasets used by any stage, sorted (the interleave's fixed order)."""
    return sorted({n for s in data.stages for part in (s.blend, s.end_blend or {}) for n in part})


def _vector(blend: dict[str, float], names: list[str]) -> np.ndarray:
    v = np.array([float(blend.get(n, 0.0)) for n in names], dtype=np.float64)
    return v / v.sum()


class Schedule:
    """Stages resolved against the global batch size and an anchor point."""

    def __init__(self, data: DataConfig, global_batch_size: int, anchor_iter: int = 0, anchor_samples: int = 0) -> None:
        self.names = dataset_names(data)
        self.global_batch_size = global_batch_size
        self.anchor_iter, self.anchor_samples = anchor_iter, anchor_samples
        self.stages: list[Stage] = []
        start = 0
        for i, (s, iters) in enumerate(zip(data.stages, stage_iters(data, global_batch_size), strict=True)):
            a = _vector(s.blend, self.names)
            b = _vector(s.end_blend, self.names) if s.end_blend else a
            self.stages.append(
                Stage(
                    index=i,
                    name=s.name,
                    start_iter=start,
                    end_iter=None if iters is None else start + iters,
                    start_sample=self.sample_at(start),
                    num_samples=None if iters is None else iters * global_batch_size,
                    start_weights=a,
                    end_weights=b,
                    packing=s.packing,
                    reset_position_ids=s.reset_position_ids,
                    reset_attention_mask=s.reset_attention_mask,
                    eod_mask_loss=s.eod_mask_loss,
                    lr_rewarm_iters=s.lr_rewarm_iters,
                )
            )
            if iters is not None:
                start += iters

    @property
    def total_iters(self) -> int | None:
        """Steps of all stages, None when the last one is open-ended."""
        return self.stages[-1].end_iter

    def sample_at(self, iteration: int) -> int:
        """Global index of the first sample of step ``iteration``."""
        return self.anchor_samples + (iteration - self.anchor_iter) * self.global_batch_size

    def stage_at(self, iteration: int) -> Stage:
        """The stage step ``iteration`` (0-based) belongs to; past the last stage's end, the last."""
        for stage in self.stages:
            if stage.end_iter is None or iteration < stage.end_iter:
                return stage
        return self.stages[-1]

    def is_stage_end(self, iterations_done: int) -> bool:
        """Whether ``iterations_done`` steps complete a (bounded) stage."""
        return any(s.end_iter == iterations_done for s in self.stages)
