"""Appended tokens' rows as weighted combinations of overlapping tokens' rows (FOCUS, OMP).

After a merge the new tokenizer holds every old token (same ids: the tokens the two
vocabularies *overlap* in) plus the appended ones. Both methods place old and appended tokens
in one auxiliary embedding space, express each appended token there through overlapping
tokens, and apply those weights to the base model's own rows (``resize.py``, ``plan.init``):

* ``focus`` -- after Dobler & de Melo 2023, "FOCUS: Effective Embedding Initialization for
  Monolingual Specialization of Multilingual Models" (EMNLP): the ``k`` overlapping tokens
  most similar by cosine, weighted by sparsemax over those similarities (weights >= 0 that
  sum to 1; usually fewer than ``k`` are nonzero).
* ``omp`` -- after Goddard & Neto 2025, "Training-Free Tokenizer Transplantation via
  Orthogonal Matching Pursuit": orthogonal matching pursuit of the appended token's vector
  over the overlapping tokens' vectors, ``k`` nonzero least-squares coefficients (any sign,
  not normalised).

The papers take their auxiliary space from fastText vectors trained on target text (FOCUS)
or from a donor model's embeddings (OMP). We have neither offline, so the space is built from
the target-language text tokenized by the **new** tokenizer, in seconds: co-occurrence counts
within ``window`` tokens (inside a document), positive PMI with context-distribution
smoothing 0.75 (Levy, Goldberg & Dagan 2015), a seeded randomised truncated SVD, rows
``U sqrt(S)`` scaled to unit length. Only tokens seen ``min_count`` times get a vector; an
appended token without one gets an empty entry, which ``resize.py`` fills with its
subword mean.

This is a cheap stand-in for the papers' spaces: a PPMI space from a few MB of text knows
which tokens share contexts, not much more. bench/README.md measures whether it helps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from megatron_ct.errors import ConfigError

COMBINATION_INITS = ("focus", "omp")

# One appended token's recipe: (old id, weight) pairs; its row is sum(weight x old row).
Combination = tuple[tuple[int, float], ...]


def _at_least(value: int, low: int, what: str, key: str) -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"{what} {value!r} ({key}): expected an integer >= {low}")


@dataclass(frozen=True, kw_only=True)
class AuxSpaceConfig:
    """How the auxiliary space is built and how many overlapping tokens a new token takes."""

    dim: int = 64
    """Dimensions kept by the truncated SVD."""
    window: int = 5
    """Tokens on each side counted as context (within one document)."""
    min_count: int = 5
    """Occurrences a token needs to get a vector (rarer ones keep subword_mean)."""
    k: int = 8
    """focus: overlapping tokens considered (top-k by cosine); omp: nonzero coefficients."""
    seed: int = 0
    """Seed of the randomised SVD."""

    def __post_init__(self) -> None:
        _at_least(self.dim, 2, "aux space dim", "--aux-dim")
        _at_least(self.window, 1, "aux space window", "--aux-window")
        _at_least(self.min_count, 1, "aux space min_count", "--aux-min-count")
        _at_least(self.k, 1, "overlapping tokens per new token", "--init-k")


@dataclass(frozen=True)
class AuxSpace:
    ids: np.ndarray  # [n] int64 token ids that have a vector, ascending
    vectors: np.ndarray  # [n, d] float64, unit rows


def _cooccurrence(docs: Iterable[Sequence[int]], window: int, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept token ids [n] and their symmetric co-occurrence counts [n, n] (float64)."""
    arrays = [np.asarray(d, dtype=np.int64) for d in docs if len(d)]
    if not arrays:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0))
    flat = np.concatenate(arrays)
    doc = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])  # [T] document of each position
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    keep = counts >= min_count
    dense = np.where(keep, np.cumsum(keep) - 1, -1)[inverse]  # [T] row of each position, -1: too rare
    n = int(keep.sum())
    cooc = np.zeros(n * n, dtype=np.float64)
    for offset in range(1, window + 1):
        a, b = dense[:-offset], dense[offset:]
        ok = (a >= 0) & (b >= 0) & (doc[:-offset] == doc[offset:])
        cooc += np.bincount(a[ok] * n + b[ok], minlength=n * n)
    cooc = cooc.reshape(n, n)
    return ids[keep], cooc + cooc.T


def _ppmi(cooc: np.ndarray, alpha: float = 0.75) -> np.ndarray:
    """Positive PMI with the context distribution raised to ``alpha`` (rare contexts count less)."""
    total = cooc.sum()
    p_word = cooc.sum(1) / total  # [n]
    ctx = cooc.sum(0) ** alpha
    p_ctx = ctx / ctx.sum()  # [n]
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(cooc / total) - np.log(p_word)[:, None] - np.log(p_ctx)[None, :]
    return np.where(cooc > 0, np.maximum(pmi, 0.0), 0.0)


def _truncated_svd(m: np.ndarray, dim: int, seed: int, power_iters: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Top ``dim`` left singular vectors [n, dim] and values [dim] of ``m`` (randomised range
    finder with power iterations; seeded, so the space is the same on every run)."""
    q = min(dim + 10, min(m.shape))
    omega = np.random.default_rng(seed).standard_normal((m.shape[1], q))
    y, _ = np.linalg.qr(m @ omega)
    for _ in range(power_iters):
        y, _ = np.linalg.qr(m @ (m.T @ y))
    u_small, s, _ = np.linalg.svd(y.T @ m, full_matrices=False)
    return (y @ u_small)[:, :dim], s[:dim]


def build_aux_space(docs: Iterable[Sequence[int]], config: AuxSpaceConfig) -> AuxSpace:
    """The auxiliary space of the token ids in ``docs`` (each a tokenized document)."""
    ids, cooc = _cooccurrence(docs, config.window, config.min_count)
    if len(ids) < 2:
        return AuxSpace(ids=ids, vectors=np.zeros((len(ids), 0)))
    u, s = _truncated_svd(_ppmi(cooc), min(config.dim, len(ids) - 1), config.seed)
    vectors = u * np.sqrt(s)[None, :]  # [n, d]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    keep = norms[:, 0] > 0  # a token whose contexts were all too rare has no direction
    return AuxSpace(ids=ids[keep], vectors=vectors[keep] / norms[keep])


def sparsemax(z: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``z`` [n] onto the probability simplex (Martins & Astudillo 2016)."""
    desc = np.sort(z)[::-1]
    cum = np.cumsum(desc)
    ks = np.arange(1, len(z) + 1)
    support = ks[1 + ks * desc > cum][-1]
    tau = (cum[support - 1] - 1.0) / support
    return np.maximum(z - tau, 0.0)


def focus_weights(target: np.ndarray, dictionary: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``dictionary`` [n, d] and weights (sum 1, > 0) for ``target`` [d]: sparsemax over
    the cosine similarities of the ``k`` most similar rows."""
    sims = dictionary @ target / (np.linalg.norm(dictionary, axis=1) * np.linalg.norm(target) + 1e-12)  # [n]
    top = np.argsort(-sims, kind="stable")[: min(k, len(sims))]
    weights = sparsemax(sims[top])
    nonzero = weights > 0
    return top[nonzero], weights[nonzero]


def omp(target: np.ndarray, dictionary: np.ndarray, k: int, tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal matching pursuit: at most ``k`` rows of ``dictionary`` [n, d] and coefficients
    whose combination is closest to ``target`` [d] (least squares on the chosen rows).

    Each step picks the row most correlated (by cosine) with the residual, then refits all
    chosen coefficients; it stops early once the residual is below ``tol`` times |target|.
    """
    norms = np.linalg.norm(dictionary, axis=1)
    usable = norms > 0
    chosen: list[int] = []
    coef = np.zeros(0)
    residual = target.astype(np.float64)
    stop = tol * max(np.linalg.norm(target), 1e-300)
    for _ in range(min(k, int(usable.sum()))):
        corr = np.abs(dictionary @ residual) / np.where(usable, norms, 1.0)
        corr[~usable] = -1.0
        corr[chosen] = -1.0
        chosen.append(int(np.argmax(corr)))
        atoms = dictionary[chosen]  # [len(chosen), d]
        coef, *_ = np.linalg.lstsq(atoms.T, target, rcond=None)
        residual = target - atoms.T @ coef
        if np.linalg.norm(residual) <= stop:
            break
    return np.asarray(chosen, dtype=np.int64), coef


def overlap_combinations(
    method: str, space: AuxSpace, old_vocab_size: int, num_new: int, k: int
) -> tuple[Combination, ...]:
    """Per appended token (ids ``old_vocab_size + j``, j < ``num_new``): its (old id, weight)
    pairs by ``method``, or ``()`` when it has no vector (or no overlapping token has one)."""
    if method not in COMBINATION_INITS:
        raise ConfigError(f"combination init {method!r} (--init): expected one of {', '.join(COMBINATION_INITS)}")
    _at_least(k, 1, "overlapping tokens per new token", "--init-k")
    overlap = space.ids < old_vocab_size
    cand_ids, dictionary = space.ids[overlap], space.vectors[overlap]  # [n_old], [n_old, d]
    row_of = {int(t): i for i, t in enumerate(space.ids)}
    out: list[Combination] = []
    for j in range(num_new):
        row = row_of.get(old_vocab_size + j)
        if row is None or not len(cand_ids):
            out.append(())
            continue
        target = space.vectors[row]
        picked, weights = (focus_weights if method == "focus" else omp)(target, dictionary, k)
        pairs = zip(cand_ids[picked].tolist(), weights.tolist(), strict=True)
        out.append(tuple((int(i), float(w)) for i, w in pairs if math.isfinite(w)))
    return tuple(out)
