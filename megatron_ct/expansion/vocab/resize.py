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
* ``focus`` / ``omp``: a weighted combination of old rows, ``plan.combinations`` (per token,
  (old id, weight) pairs that :mod:`megatron_ct.expansion.vocab.overlap` finds among the
  overlapping tokens in an auxiliary space); a token with an empty entry gets its subword
  mean.
* ``mean_noise``: the mean of all old rows plus small seeded noise (``plan.noise`` x the old
  rows' std), after Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language
  Models". Meant for **output** rows (``plan.output_init``): a new token's logit is then the
  average of the old tokens' logits (plus noise), so by Jensen its probability starts no
  higher than the old tokens' average and it does not steal probability from them, where a
  subword-mean output row gives it the logits of its pieces.

Tied embeddings are one matrix, so input and output rows share one init; ``plan.untie``
gives the output layer its own matrix at expansion (old rows copied from the embedding,
appended rows by ``output_init``). The model then has ``h x V`` more parameters.

Padding rows get the mean of all old rows rather than zeros: a zero output row gives logit
0, which can outrank most real tokens, while an average row gives an average logit.

Matrices are resized whole (our checkpoints store global tensors, so a checkpoint saved at
any tensor-parallel size is resized the same way); every statistic is computed in a fixed
order on CPU in float64, so the result does not depend on where it is computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from megatron_ct.errors import ConfigError
from megatron_ct.expansion.vocab.overlap import COMBINATION_INITS, Combination
from megatron_ct.model.llama import padded_vocab_size

INIT_METHODS = ("subword_mean", "mean", "random", *COMBINATION_INITS, "mean_noise")


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
    """One of ``INIT_METHODS`` (see the module docstring)."""
    divisible_by: int = 128
    """``make_vocab_size_divisible_by``: the new matrix has a multiple of this times TP rows."""
    seed: int = 0
    """Seed of the ``random`` and ``mean_noise`` inits (a CPU generator, identical on every rank)."""
    combinations: tuple[Combination, ...] = ()
    """``focus``/``omp``: per appended token, (old id, weight) pairs; its row is the weighted
    sum of those old rows (an empty entry: its subword mean). Unused by the other inits."""
    noise: float = 0.01
    """``mean_noise``: standard deviation of the noise as a fraction of the old rows' std."""
    output_init: str | None = None
    """Init of the output layer's appended rows when it is its own matrix (untied, or
    ``untie``); None: as ``init``. ``mean_noise`` keeps new tokens from stealing probability."""
    untie: bool = False
    """Tied embeddings: give the output layer its own matrix (old rows copied from the
    embedding, appended rows by ``output_init``)."""

    def __post_init__(self) -> None:
        for key, init in (("init", self.init), ("output_init", self.output_init or self.init)):
            if init not in INIT_METHODS:
                # ConfigError is a ValueError: one line at the command line
                raise ConfigError(f"vocab resize init {init!r} (plan.{key}): expected one of {', '.join(INIT_METHODS)}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ConfigError(f"vocab resize noise {self.noise!r} (plan.noise): expected a finite number >= 0")
        uses_combinations = {self.init, self.output_init} & set(COMBINATION_INITS)
        if uses_combinations and len(self.combinations) != len(self.sources):
            raise ConfigError(
                f"vocab resize init {sorted(uses_combinations)[0]} has {len(self.combinations)} combinations for "
                f"{len(self.sources)} appended tokens (plan.combinations): expected one (possibly empty) per token"
            )
        for j, pairs in enumerate(self.combinations):
            bad = [(i, w) for i, w in pairs if not (0 <= i < self.old_vocab_size and math.isfinite(w))]
            if bad:
                raise ConfigError(
                    f"combinations[{j}] (new id {self.old_vocab_size + j}) has pairs {bad[:3]} "
                    f"(plan.combinations): expected old ids in [0, {self.old_vocab_size}) with finite weights"
                )
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

    def for_output(self) -> VocabResizePlan:
        """The plan of the output layer's rows (its own init; other noise than the input's)."""
        if self.output_init is None:
            return self
        return replace(self, init=self.output_init, output_init=None, seed=self.seed + 1)


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


def _combined(old: torch.Tensor, combinations: Sequence[Combination], fallback: torch.Tensor) -> torch.Tensor:
    """[len(combinations), h] float64: sum of weight x old row per entry (``fallback`` row where
    the entry is empty), each added in its listed order, so any subset gives the same rows."""
    out = fallback.clone()
    for j, pairs in enumerate(combinations):
        if pairs:
            ids = torch.tensor([i for i, _ in pairs], dtype=torch.long)
            weights = torch.tensor([w for _, w in pairs], dtype=torch.float64)
            rows = old[ids].to(torch.float64)  # [n_j, h]
            acc = rows[0] * weights[0]
            for k in range(1, len(pairs)):
                acc.add_(rows[k] * weights[k])
            out[j] = acc
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
        elif plan.init in COMBINATION_INITS:
            subword = _subword_means(old, plan.sources[local], stats.mean_row)
            new = _combined(old, plan.combinations[local], subword)
        elif plan.init == "mean":
            new = stats.mean_row.expand(hi - lo, -1)
        else:
            # Draw all appended rows and slice, so any row range agrees with the whole.
            gen = torch.Generator().manual_seed(plan.seed)
            noise = torch.randn(plan.num_new, h, generator=gen, dtype=torch.float32)[local].double()
            if plan.init == "random":
                new = noise * stats.std
            else:  # mean_noise
                new = stats.mean_row + noise * (plan.noise * stats.std)
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
    resized once and the same new tensor is returned twice, so they stay tied; with
    ``plan.untie`` the output layer is a new matrix: the embedding's old rows, its own
    appended rows (``plan.output_init``).
    """
    new_embedding = resize_vocab_matrix(embedding, plan, tp)
    if output_layer is None or output_layer is embedding:
        if plan.untie:
            return new_embedding, resize_vocab_matrix(embedding, plan.for_output(), tp)
        if plan.output_init not in (None, plan.init):
            raise ConfigError(
                f"output rows init {plan.output_init} (plan.output_init, --output-init): the model ties its "
                "embeddings, so output rows are input rows; expected untie (--untie-embeddings) or no output init"
            )
        return new_embedding, new_embedding
    if output_layer.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"output layer has hidden size {output_layer.shape[1]}, embedding has {embedding.shape[1]}; "
            "expected both [V_padded, h] with the same h"
        )
    return new_embedding, resize_vocab_matrix(output_layer, plan.for_output(), tp)
