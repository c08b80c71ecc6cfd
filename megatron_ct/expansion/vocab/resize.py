"""Grow a model's vocabulary matrices for appended tokens (pure tensor functions).

An input embedding and an output layer are both ``[V_padded, h]`` matrices whose rows are
token ids. After a tokenizer merge appends ``n`` tokens (old ids unchanged), a resized
matrix ``[V_new_padded, h]`` is laid out as::

    rows [0, V_old)                  old tokens          copied bit for bit
    rows [V_old, V_new)              appended tokens     initialised by ``plan.init``
    rows [V_new, V_new_padded)       vocabulary padding  mean of the old rows

with ``V_new = V_old + n`` and ``V_new_padded`` Megatron's padded size
(:func:`megatron_ct.model.llama.padded_vocab_size`). The old matrix's own padding rows
(``[V_old, V_old_padded)``) are never targets and are dropped.

Init methods for appended tokens (``plan.init``):

* ``subword_mean`` (default): the mean of the old rows of the ids the **old** tokenizer
  produces for the new token's text (byte-fallback ids included), so the model starts out
  reading/predicting the new token as it read/predicted its pieces.
* ``mean``: the mean of all old rows (an "average token"), for ablation.
* ``random``: normal with the old rows' standard deviation (one scalar), for ablation;
  seeded, so every TP rank draws the same rows.

Padding rows get the mean of all old rows rather than zeros: a zero output row gives logit
0, which can outrank most real tokens, while an average row gives an average logit.

Matrices are resized whole (our checkpoints store global tensors, so a checkpoint saved at
any tensor-parallel size is resized the same way); every statistic is computed in a fixed
order on CPU in float64, so the result does not depend on where it is computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_ct.model.llama import padded_vocab_size

INIT_METHODS = ("subword_mean", "mean", "random")


@dataclass(frozen=True, kw_only=True)
class VocabResizePlan:
    """What to append and how to initialise it; shared by every TP rank."""

    old_vocab_size: int
    """True size of the old tokenizer (not padded): rows ``[0, old_vocab_size)`` are kept."""
    sources: tuple[tuple[int, ...], ...]
    """Per appended token, in new-id order: the old ids the old tokenizer produces for its
    text. Its length is the number of appended tokens; used by ``subword_mean`` (an empty
    entry falls back to the mean of all old rows)."""
    init: str = "subword_mean"
    """``subword_mean``, ``mean`` or ``random`` (see the module docstring)."""
    divisible_by: int = 128
    """``make_vocab_size_divisible_by``: the new matrix has a multiple of this times TP rows."""
    seed: int = 0
    """Seed of the ``random`` init (a CPU generator, identical on every rank)."""

    def __post_init__(self) -> None:
        if self.init not in INIT_METHODS:
            raise ValueError(f"vocab resize init {self.init!r} is not one of {', '.join(INIT_METHODS)}")
        if self.old_vocab_size < 1 or self.divisible_by < 1:
            raise ValueError(
                f"vocab resize needs old_vocab_size >= 1 and divisible_by >= 1, got "
                f"{self.old_vocab_size} and {self.divisible_by}"
            )
        for j, ids in enumerate(self.sources):
            bad = [i for i in ids if not 0 <= i < self.old_vocab_size]
            if bad:
                raise ValueError(
                    f"sources[{j}] (new id {self.old_vocab_size + j}) has ids {bad[:5]} outside the "
                    f"old vocabulary [0, {self.old_vocab_size})"
                )

    @property
    def num_new(self) -> int:
        return len(self.sources)

    @property
    def new_vocab_size(self) -> int:
        """True size of the merged tokenizer."""
        return self.old_vocab_size + self.num_new

    def padded_size(self, tp: int = 1) -> int:
        """Rows of the resized matrix for tensor-parallel size ``tp``."""
        return padded_vocab_size(self.new_vocab_size, self.divisible_by, tp)


@dataclass(frozen=True)
class _OldStats:
    mean_row: torch.Tensor  # [h] float64, mean over the old rows
    std: float  # population std over every element of the old rows


def _old_stats(old: torch.Tensor) -> _OldStats:
    """Mean row and scalar std of ``old`` [V_old, h] in a fixed summation order.

    Rows are added one at a time (elementwise adds are exact-deterministic) and the column
    sums are combined with ``math.fsum`` (correctly rounded), so the result does not depend
    on thread count or on which rank computes it; a plain ``.sum(0)`` may split the sum
    across threads differently in different processes.
    """
    h = old.shape[1]
    col_sum = torch.zeros(h, dtype=torch.float64)
    col_sumsq = torch.zeros(h, dtype=torch.float64)
    for start in range(0, old.shape[0], 4096):
        chunk = old[start : start + 4096].to(torch.float64)  # [<=4096, h]
        for row in chunk:
            col_sum.add_(row)
            col_sumsq.addcmul_(row, row)
    n = old.shape[0]
    mean_all = math.fsum(col_sum.tolist()) / (n * h)
    var = max(math.fsum(col_sumsq.tolist()) / (n * h) - mean_all * mean_all, 0.0)
    return _OldStats(mean_row=col_sum / n, std=math.sqrt(var))


def _subword_means(old: torch.Tensor, sources: Sequence[Sequence[int]], fallback: torch.Tensor) -> torch.Tensor:
    """[len(sources), h] float64: mean of ``old`` rows per source list (``fallback`` if empty).

    Tokens are grouped by source length L and their L rows added left to right, elementwise,
    so each mean is the same whichever subset of tokens is computed together.
    """
    out = fallback.expand(len(sources), -1).clone()
    by_len: dict[int, list[int]] = {}
    for j, ids in enumerate(sources):
        if ids:
            by_len.setdefault(len(ids), []).append(j)
    for length, rows in by_len.items():
        idx = torch.tensor([sources[j] for j in rows], dtype=torch.long)  # [n_L, L]
        picked = old[idx].to(torch.float64)  # [n_L, L, h]
        acc = picked[:, 0].clone()
        for k in range(1, length):
            acc.add_(picked[:, k])
        out[rows] = acc / length
    return out


def _rows(old_full: torch.Tensor, plan: VocabResizePlan, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of the resized matrix, from the whole old matrix [>=V_old, h]."""
    v_old, v_new = plan.old_vocab_size, plan.new_vocab_size
    if old_full.dim() != 2 or old_full.shape[0] < v_old:
        raise ValueError(
            f"vocab matrix has shape {tuple(old_full.shape)}; expected [rows >= old vocab size {v_old}, hidden]"
        )
    dtype, device = old_full.dtype, old_full.device
    old = old_full[:v_old].detach().cpu()  # [V_old, h]; statistics are computed on CPU
    h = old.shape[1]
    stats = _old_stats(old)
    out = torch.empty(stop - start, h, dtype=dtype)

    # Old rows: copied, never recomputed, so they stay bit-identical.
    keep = range(start, min(stop, v_old))
    if len(keep):
        out[: len(keep)] = old[keep.start : keep.stop]

    # Appended rows falling in [start, stop).
    lo, hi = max(start, v_old), min(stop, v_new)
    if lo < hi:
        local = slice(lo - v_old, hi - v_old)  # positions among the appended tokens
        if plan.init == "subword_mean":
            new = _subword_means(old, plan.sources[local], stats.mean_row)
        elif plan.init == "mean":
            new = stats.mean_row.expand(hi - lo, -1)
        else:
            # Draw all appended rows and slice, so any row range agrees with the whole.
            gen = torch.Generator().manual_seed(plan.seed)
            new = torch.randn(plan.num_new, h, generator=gen, dtype=torch.float32)[local].double() * stats.std
        out[lo - start : hi - start] = new.to(dtype)

    # Padding rows.
    pad_lo = max(start, v_new)
    if pad_lo < stop:
        out[pad_lo - start :] = stats.mean_row.to(dtype)
    return out.to(device)


def resize_vocab_matrix(weight: torch.Tensor, plan: VocabResizePlan, tp: int = 1) -> torch.Tensor:
    """Resized copy of a whole vocabulary matrix: [V_old_padded, h] -> [plan.padded_size(tp), h].

    ``weight`` needs at least ``plan.old_vocab_size`` rows; its padding rows are ignored.
    """
    return _rows(weight, plan, 0, plan.padded_size(tp))


def resize_embeddings(
    embedding: torch.Tensor,
    output_layer: torch.Tensor | None,
    plan: VocabResizePlan,
    tp: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize an input embedding and an output layer with one plan.

    Tied embeddings (``output_layer`` is None or the same tensor as ``embedding``) are
    resized once and the same new tensor is returned twice, so they stay tied.
    """
    new_embedding = resize_vocab_matrix(embedding, plan, tp)
    if output_layer is None or output_layer is embedding:
        return new_embedding, new_embedding
    if output_layer.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"output layer has hidden size {output_layer.shape[1]}, embedding has {embedding.shape[1]}; "
            "expected both [V_padded, h] with the same h"
        )
    return new_embedding, resize_vocab_matrix(output_layer, plan, tp)
