"""The curriculum in iterations: the run's stages, built once from the config and shared.

A :class:`Schedule` is what the data source, the freeze plan, the LR scheduler and the
trainer's stage-start hook all read; nothing else derives stages from the config. Stage
lengths are steps (``iters``, or ``tokens`` rounded up to whole steps of
``global_batch_size * seq_length`` at the stage's own sequence length), laid end to end from
iteration 0; an open-ended last stage runs to ``train.train_iters``. A step belongs wholly to
one stage.

Each stage carries its effective sequence length and RoPE (``rotary_base``, ``rope_scaling``,
``max_position_embeddings``): a stage's own value, else the stage before's, the first stage's
else the run's (``data.seq_length``, ``model.*``). So a long-context stage's length and RoPE
stay in force in the stages after it until one changes them again.

A run on the synthetic stream has one implicit stage, ``main``, with no datasets: the same
code path then covers curricula and plain runs (what trains is the run-level
``train.trainable_params``, which is simply every stage's default).

Blends are vectors over ``names`` (every dataset any stage uses, sorted), normalised to sum
1. Where those weights fall in the global *sample* stream depends on the data position, which
the data source owns (:mod:`megatron_ct.data.interleave`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from megatron_ct.config.rope import RopeScaling
from megatron_ct.config.schema import CTConfig, DataConfig, ModelConfig


@dataclass(frozen=True, eq=False)
class Stage:
    """One curriculum stage, in iterations (compared by identity: one object per stage)."""

    index: int
    name: str
    start_iter: int
    end_iter: int | None  # exclusive; None: open-ended (runs to the end of training)
    start_weights: np.ndarray  # [len(schedule.names)], sums to 1 (empty for the synthetic stream)
    end_weights: np.ndarray  # == start_weights without a ramp
    packing: str = "concat"
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    lr_rewarm_iters: int = 0
    trainable_params: tuple[str, ...] | None = None  # the stage's patterns, else the run's; None: all
    trainable_key: str = "train.trainable_params"  # the config key those patterns come from
    lr_mult: dict = field(default_factory=dict)  # class -> LR multiplier (optim.decoupled_lr, train, stage)
    # The effective sequence length and RoPE (always set by Schedule.from_config).
    seq_length: int | None = None
    rotary_base: float | None = None
    rope_scaling: dict | None = None  # HF rope_scaling; None: plain RoPE
    max_position_embeddings: int | None = None

    @property
    def rope(self) -> tuple:
        """What the model's rotary embedding depends on: (rotary_base, rope_scaling, max_position_embeddings)."""
        return (self.rotary_base, self.rope_scaling, self.max_position_embeddings)

    @property
    def ramped(self) -> bool:
        return not np.array_equal(self.start_weights, self.end_weights)

    @property
    def iters(self) -> int | None:
        return None if self.end_iter is None else self.end_iter - self.start_iter


def _carried(own: list, first):
    """Each stage's value: its own, else the stage before's (the first stage's: ``first``)."""
    out, value = [], first
    for v in own:
        value = value if v is None else v
        out.append(value)
    return out


def stage_seq_lengths(data: DataConfig) -> list[int]:
    """Sequence length of each configured stage (its own, else carried over from the stage before)."""
    return _carried([s.seq_length for s in data.stages], data.seq_length)


def model_rope(m: ModelConfig) -> tuple[float, dict | None, int]:
    """(rotary_base, rope_scaling, max_position_embeddings) of the model config, as a stage's ``rope``."""
    return (m.rotary_base, _scaling(m.rope_scaling), m.max_position_embeddings)


def stage_ropes(cfg: CTConfig) -> list[tuple[float, dict | None, int]]:
    """(rotary_base, rope_scaling, max_position_embeddings) of each configured stage, each carried
    over from the stage before where the stage does not set it (first stage: the model's)."""
    m, stages = cfg.model, cfg.data.stages
    bases = _carried([s.rotary_base for s in stages], m.rotary_base)
    scalings = _carried([s.rope_scaling for s in stages], m.rope_scaling)
    max_pos = _carried([s.max_position_embeddings for s in stages], m.max_position_embeddings)
    return list(zip(bases, map(_scaling, scalings), max_pos, strict=True))


def _scaling(rope_scaling: dict | None) -> dict | None:
    """``rope_scaling`` with plain RoPE as None (``{rope_type: default}`` is model.rope_scaling=null)."""
    return rope_scaling if rope_scaling and RopeScaling.from_hf_dict(rope_scaling).rope_type != "default" else None


def stage_iters(data: DataConfig, global_batch_size: int) -> list[int | None]:
    """Length of each configured stage in steps (None for an open-ended last stage); ``tokens``
    count at the stage's own sequence length."""
    out: list[int | None] = []
    for s, seq in zip(data.stages, stage_seq_lengths(data), strict=True):
        if s.iters is not None:
            out.append(s.iters)
        elif s.tokens is not None:
            out.append(math.ceil(s.tokens / (global_batch_size * seq)))
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
    """The run's stages, in order."""

    def __init__(self, stages: list[Stage], names: list[str], curriculum: bool) -> None:
        self.stages = stages
        self.names = names  # datasets, in interleave order
        self.curriculum = curriculum  # False: the synthetic stream's single implicit stage

    @classmethod
    def from_config(cls, cfg: CTConfig) -> Schedule:
        run_trainable = tuple(cfg.train.trainable_params) if cfg.train.trainable_params else None
        run_mult = {}
        if cfg.optim.decoupled_lr is not None:  # Megatron-LM's --decoupled-lr, as multipliers
            run_mult = dict.fromkeys(("embedding", "output"), cfg.optim.decoupled_lr / cfg.optim.lr)
        run_mult.update(cfg.train.lr_mult or {})
        d = cfg.data
        if d.source != "indexed":
            empty = np.zeros(0)
            base, scaling, max_pos = model_rope(cfg.model)
            main = Stage(
                0,
                "main",
                0,
                None,
                empty,
                empty,
                trainable_params=run_trainable,
                lr_mult=run_mult,
                seq_length=d.seq_length,
                rotary_base=base,
                rope_scaling=scaling,
                max_position_embeddings=max_pos,
            )
            return cls([main], [], False)
        names = dataset_names(d)
        stages, start = [], 0
        iters_ = stage_iters(d, cfg.train.global_batch_size)
        settings = zip(d.stages, iters_, stage_seq_lengths(d), stage_ropes(cfg), strict=True)
        for i, (s, iters, seq, (base, scaling, max_pos)) in enumerate(settings):
            a = _vector(s.blend, names)
            stages.append(
                Stage(
                    index=i,
                    name=s.name,
                    start_iter=start,
                    end_iter=None if iters is None else start + iters,
                    start_weights=a,
                    end_weights=_vector(s.end_blend, names) if s.end_blend else a,
                    packing=s.packing,
                    reset_position_ids=s.reset_position_ids,
                    reset_attention_mask=s.reset_attention_mask,
                    eod_mask_loss=s.eod_mask_loss,
                    lr_rewarm_iters=s.lr_rewarm_iters,
                    trainable_params=tuple(s.trainable_params) if s.trainable_params else run_trainable,
                    trainable_key=f"data.stages[{i}].trainable_params"
                    if s.trainable_params
                    else "train.trainable_params",
                    lr_mult={**run_mult, **(s.lr_mult or {})},
                    seq_length=seq,
                    rotary_base=base,
                    rope_scaling=scaling,
                    max_position_embeddings=max_pos,
                )
            )
            if iters is not None:
                start += iters
        return cls(stages, names, True)

    def stage_at(self, iteration: int) -> Stage:
        """The stage step ``iteration`` (0-based) belongs to; past the last stage's end, the last."""
        for stage in self.stages:
            if stage.end_iter is None or iteration < stage.end_iter:
                return stage
        return self.stages[-1]

    def is_stage_end(self, iterations_done: int) -> bool:
        """Whether ``iterations_done`` steps complete a (bounded) stage."""
        return any(s.end_iter == iterations_done for s in self.stages)

    def describe(self, stage: Stage, train_iters: int) -> str:
        """One log line for a stage start."""
        end = stage.end_iter if stage.end_iter is not None else train_iters
        parts = [f"stage {stage.index + 1}/{len(self.stages)} {stage.name!r}: iterations {stage.start_iter + 1}-{end}"]
        if self.curriculum:
            blend = ", ".join(
                f"{n} {a:.3f}" + (f"->{b:.3f}" if stage.ramped else "")
                for n, a, b in zip(self.names, stage.start_weights, stage.end_weights, strict=True)
                if a > 0 or b > 0
            )
            parts += [f"packing {stage.packing}", f"blend {blend}"]
        if stage.lr_rewarm_iters:
            parts.append(f"LR re-warm over {stage.lr_rewarm_iters} steps")
        parts.append(f"seq {stage.seq_length}")
        if stage.index == 0 or stage.rope != self.stages[stage.index - 1].rope:
            scaling = f", rope_scaling {stage.rope_scaling}" if stage.rope_scaling else ""
            parts.append(f"RoPE theta {stage.rotary_base:g}{scaling}, max positions {stage.max_position_embeddings}")
        parts.append("training " + (", ".join(stage.trainable_params) if stage.trainable_params else "everything"))
        if any(v != 1.0 for v in stage.lr_mult.values()):
            parts.append("LR x " + ", ".join(f"{k} {v:g}" for k, v in sorted(stage.lr_mult.items())))
        return " | ".join(parts)
