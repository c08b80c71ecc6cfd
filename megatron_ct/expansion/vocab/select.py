"""Which pieces a vocabulary merge appends: format-independent selection rules.

Pieces are strings in the base vocabulary's alphabet (SentencePiece / LLaMA metaspace:
``'▁'`` stands for a space). Both merge formats (``merge_sp``, ``merge_hf``) call
:func:`choose_new_pieces`, so a SentencePiece model and a ``tokenizer.json`` merged from
the same candidates get the same pieces in the same order.

Rules:

* Order: the candidates' order (an addition model's piece order, i.e. its merge
  priority), so appended pieces keep that priority among themselves.
* Buildable: BPE only produces a piece by joining two adjacent symbols that are in the
  vocabulary, so every appended piece of two or more characters must split into two
  pieces of the merged vocabulary (single characters are always buildable). Pieces that
  cannot be built would be dead ids; they are dropped, and under a cap the pieces a
  chosen piece needs are pulled in with it (counted against the cap).
* Stable strings (optional, the "low-frequency only" strategy): pieces that change the
  segmentation of any protected string (frequent strings of the old language, see
  :func:`frequent_strings`) are dropped, until every protected string segments exactly as
  with the base vocabulary.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Segments piece-form strings into ids, with no dummy prefix and no normalisation.
Segmenter = Callable[[list[str]], list[list[int]]]


@dataclass(frozen=True)
class MergeResult:
    """What a merge appended."""

    new_pieces: list[str]
    """Appended pieces in new-id order (piece form: ``'▁'`` for a space)."""
    first_new_id: int
    """Id of ``new_pieces[0]``; every id below it is unchanged (the base vocabulary size)."""

    @property
    def vocab_size(self) -> int:
        return self.first_new_id + len(self.new_pieces)

    def new_ids(self) -> dict[str, int]:
        return {piece: self.first_new_id + i for i, piece in enumerate(self.new_pieces)}


def _needed(piece: str, have: Collection[str], pool: Collection[str], memo: dict) -> list[str] | None:
    """Fewest pieces from ``pool`` to add so ``piece`` is buildable on top of ``have``.

    Returns [] when ``piece`` is already in ``have``, None when it cannot be built.
    Single characters are initial BPE symbols, but are still added as pieces when
    missing: a ``tokenizer.json`` BPE can only merge symbols that are vocabulary entries.
    """
    if piece in have:
        return []
    if piece in memo:
        return memo[piece]
    if len(piece) == 1:
        best = [piece] if piece in pool else None
    else:
        best = None
        if piece in pool:
            for k in range(1, len(piece)):
                left = _needed(piece[:k], have, pool, memo)
                right = _needed(piece[k:], have, pool, memo) if left is not None else None
                if left is None or right is None:
                    continue
                extra = list(dict.fromkeys(left + right + [piece]))
                if best is None or len(extra) < len(best):
                    best = extra
    memo[piece] = best
    return best


def select_buildable(candidates: Sequence[str], base_vocab: Collection[str], max_new: int | None = None) -> list[str]:
    """Candidates not in ``base_vocab`` that BPE can build, at most ``max_new``, in candidate order.

    Walks candidates in order; each is taken together with the missing pieces it needs (from
    the candidates), if all of them fit under ``max_new``.
    """
    order = {}
    for piece in candidates:
        if piece and piece not in base_vocab and piece not in order:
            order[piece] = len(order)
    chosen: set[str] = set()
    have = _Union(base_vocab, chosen)
    limit = len(order) if max_new is None else max_new
    for piece in order:
        if len(chosen) >= limit:
            break
        if piece in chosen:
            continue
        need = _needed(piece, have, order, {})
        if need is not None and len(chosen) + len(need) <= limit:
            chosen.update(need)
    return sorted(chosen, key=order.__getitem__)


class _Union(Collection):
    """Read-only membership view of two collections (the base vocab stays uncopied)."""

    def __init__(self, a: Collection[str], b: Collection[str]) -> None:
        self.a, self.b = a, b

    def __contains__(self, x: object) -> bool:
        return x in self.a or x in self.b

    def __iter__(self):
        yield from self.a
        yield from self.b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)


def drop_unstable(
    pieces: list[str],
    base_vocab: Collection[str],
    protect: Sequence[str],
    segment_base: Segmenter,
    segmenter_for: Callable[[list[str]], Segmenter],
) -> list[str]:
    """Drop pieces until every ``protect`` string segments as with the base vocabulary.

    ``segmenter_for(pieces)`` builds a segmenter of the base vocabulary plus ``pieces``.
    A protected string that changes can only have changed through appended pieces that
    occur in it, so those are dropped (with any piece no longer buildable), and the check
    repeats until nothing changes.
    """
    protect = list(dict.fromkeys(protect))
    if not protect or not pieces:
        return pieces
    before = segment_base(protect)
    max_len = max(len(p) for p in pieces)
    for _ in range(100):
        after = segmenter_for(pieces)(protect)
        changed = [s for s, a, b in zip(protect, after, before, strict=True) if a != b]
        if not changed:
            return pieces
        current = set(pieces)
        culprits = {
            s[i:j] for s in changed for i in range(len(s)) for j in range(i + 1, min(len(s), i + max_len) + 1)
        } & current
        log.info(
            "low-frequency filter: %d protected strings changed; dropping %d pieces",
            len(changed),
            len(culprits),
        )
        pieces = select_buildable([p for p in pieces if p not in culprits], base_vocab)
    raise RuntimeError("low-frequency filter did not converge in 100 rounds")


def choose_new_pieces(
    candidates: Sequence[str],
    base_vocab: Collection[str],
    *,
    max_new: int | None = None,
    protect: Sequence[str] = (),
    segment_base: Segmenter | None = None,
    segmenter_for: Callable[[list[str]], Segmenter] | None = None,
) -> list[str]:
    """The pieces to append: buildable, protected strings stable, at most ``max_new``.

    The stability filter runs before the cap (so the cap counts only pieces that survive)
    and again after it, since a subset can segment a protected string differently.
    """
    pieces = select_buildable(candidates, base_vocab)
    if protect:
        if segment_base is None or segmenter_for is None:
            raise ValueError("choose_new_pieces: protect strings need segment_base and segmenter_for")
        pieces = drop_unstable(pieces, base_vocab, protect, segment_base, segmenter_for)
    if max_new is not None:
        pieces = select_buildable(pieces, base_vocab, max_new)
        if protect:
            pieces = drop_unstable(pieces, base_vocab, protect, segment_base, segmenter_for)
    return pieces


def frequent_strings(lines: Iterable[str], top_k: int = 20000, max_ngram: int = 4, space: str = "▁") -> list[str]:
    """The ``top_k`` most frequent strings of ``lines``, in piece form, for ``protect``.

    Counted: each whitespace-separated word as it appears after a space (``'▁word'``), and
    the character 2..``max_ngram``-grams inside words longer than ``max_ngram``, which is
    what "frequent strings" are for scripts written without spaces (Chinese, Japanese).
    """
    counts: Counter[str] = Counter()
    for line in lines:
        for word in line.split():
            counts[space + word] += 1
            if len(word) > max_ngram:
                for n in range(2, max_ngram + 1):
                    counts.update(word[i : i + n] for i in range(len(word) - n + 1))
    return [s for s, _ in counts.most_common(top_k)]
