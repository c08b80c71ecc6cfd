"""A named dataset read as one endless token stream over megatron-core IndexedDataset files
(opened and validated by :mod:`megatron_ct.data.indexed`).

The stream of a dataset is epoch 0, epoch 1, ... back to back; epoch ``e`` is all of the
dataset's documents (every sequence of every prefix within ``doc_range``) in an order
shuffled by ``(seed, dataset name, e)``, concatenated. A dataset's whole read state is one
integer, its *position* (tokens of the stream consumed so far), which is what the
checkpoint stores and what makes consumption sequential: a sample is always taken at the
current position, so nothing is repeated or skipped, whatever packing or blend comes next.

Samples (``seq_length`` is the current stage's, so a stage at another length re-packs the
same stream from where the stage before left it):
- ``concat``: the window ``[p, p + seq_length + 1)``; the position advances by
  ``seq_length`` (the last token is the next window's first input, as in Megatron-LM).
- ``by_source``: whole documents from ``p`` to the next *pack boundary*. Boundaries come from
  a greedy packing of each epoch (documents in order, a new pack when the next document
  does not fit in ``seq_length + 1`` tokens; a longer document is cut into full packs), so
  a sample holds whole documents of this dataset only; they are cached per epoch and length.
  Starting mid-pack (after a ``concat`` stage, or a by_source stage at another length) yields
  the rest of that pack.

Document boundaries are taken from the index, not from EOD tokens, so masks and resets work
for data preprocessed without ``--append-eod`` too.

A prefix may be a glob (``data/web-*_text_document``, the shards of an array job): it stands
for every matching prefix, in sorted order.
"""

from __future__ import annotations

import glob
import logging
import os
import time
import zlib
from dataclasses import dataclass

import numpy as np

from megatron_ct.config.schema import ConfigError, DatasetConfig
from megatron_ct.data.index_cache import IndexCache, cache_key
from megatron_ct.data.indexed import DatasetMeta, IndexedData, open_indexed

log = logging.getLogger("megatron_ct")


def resolve_prefix(prefix: str, data_root: str | None) -> str:
    return prefix if os.path.isabs(prefix) or data_root is None else os.path.join(data_root, prefix)


def resolve_prefixes(patterns: list[str], data_root: str | None, key: str) -> list[str]:
    """Prefixes of ``patterns`` (resolved against ``data_root``); a glob becomes every prefix whose
    ``.idx`` it matches, sorted (ConfigError naming the key when it matches none)."""
    out = []
    for i, pattern in enumerate(patterns):
        path = resolve_prefix(pattern, data_root)
        if not glob.has_magic(path):
            out.append(path)
            continue
        matches = sorted(p[: -len(".idx")] for p in glob.glob(path + ".idx"))
        if not matches:
            raise ConfigError(f"{key}.prefixes[{i}]: expected the glob {path} to match .bin/.idx prefixes, found none")
        out.extend(matches)
    return out


def check_prefix(prefix: str, key: str) -> None:
    """One-line ConfigError naming the key when a prefix's .bin/.idx pair is missing."""
    missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        raise ConfigError(
            f"{key}: expected {prefix}.bin and {prefix}.idx (megatron-core IndexedDataset from "
            f"tools/preprocess_data.py), missing {' and '.join(prefix + m for m in missing)}"
        )


def _open_indexed(prefix: str) -> IndexedData:
    """Open and validate one prefix (DataError naming the file when it is unusable)."""
    return open_indexed(prefix)


def greedy_pack_boundaries(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Start offsets of the packs of documents of ``lengths`` (in order), plus the end.

    A pack holds whole documents up to ``capacity`` tokens; a longer document fills
    ``len // capacity`` packs alone and its remainder starts the next pack.
    """
    bounds = [0]
    pos = 0
    used = 0  # tokens in the open pack
    for n in lengths.tolist():
        if used and used + n > capacity:
            bounds.append(pos)
            used = 0
        if n > capacity:
            full = n // capacity
            bounds.extend(range(pos + capacity, pos + full * capacity + 1, capacity))
            if n % capacity == 0:
                bounds.pop()  # the document's end is the next pack's start only once
                used = capacity
            else:
                used = n % capacity
        else:
            used += n
        pos += n
    if bounds[-1] != pos:
        bounds.append(pos)
    return np.asarray(bounds, dtype=np.int64)


@dataclass
class Window:
    """Tokens of a sample and where documents start in it (offsets into ``tokens``)."""

    tokens: np.ndarray  # int64 [n], n <= seq_length + 1
    doc_starts: np.ndarray  # int64 offsets, ascending; 0 when the sample starts a document


class DocumentStream:
    """Epoch-shuffled (or natural-order) token stream of one named dataset."""

    def __init__(
        self,
        name: str,
        cfg: DatasetConfig,
        *,
        key: str,
        seed: int,
        cache: IndexCache,
        data_root: str | None = None,
        shuffle: bool = True,
    ) -> None:
        self.name, self.seed, self.cache, self.shuffle = name, seed, cache, shuffle
        self.key = key
        self.prefixes = resolve_prefixes(cfg.prefixes, data_root, key)
        lengths, files = [], []
        self._datasets: list[IndexedData] = []
        self._first_doc, starts = [], [0]  # per prefix
        for i, prefix in enumerate(self.prefixes):
            check_prefix(prefix, f"{key}.prefixes[{i}]")
            ds = _open_indexed(prefix)
            n = len(ds)
            lo, hi = (int(round(f * n)) for f in cfg.doc_range)
            lengths.append(ds.sequence_lengths[lo:hi])  # int32 view of the memory-mapped .idx
            self._datasets.append(ds)
            self._first_doc.append(lo)
            starts.append(starts[-1] + hi - lo)
            # The files' content fingerprint (sizes, mtimes, .idx hash), not their path: a
            # re-tokenized corpus never meets the index cache of the old one.
            files.append([ds.fingerprint, n, lo, hi])
        # Document g of the stream is document first_doc[k] + g - starts[k] of prefix k.
        self._starts = np.asarray(starts, dtype=np.int64)
        self.lengths = lengths[0] if len(lengths) == 1 else np.concatenate(lengths)  # [num_docs] int32
        self.num_docs = len(self.lengths)
        self.tokens_per_epoch = int(self.lengths.sum(dtype=np.int64))
        if self.tokens_per_epoch == 0:
            raise ConfigError(f"{key}: expected documents with tokens, got none in {', '.join(self.prefixes)}")
        # Length-aware mixing: documents of at least min_tokens appear `factor` times per epoch.
        self.upsample = cfg.upsample_long
        if self.upsample is not None and not shuffle:
            raise ConfigError(f"{key}.upsample_long: expected none for a validation set (it is read once, in order)")
        self.copies = None
        if self.upsample is not None and self.upsample["factor"] > 1:
            long_docs = self.lengths >= self.upsample["min_tokens"]
            self.copies = np.where(long_docs, self.upsample["factor"], 1).astype(np.int64)
            self.tokens_per_epoch = int((self.lengths.astype(np.int64) * self.copies).sum())
        self.docs_per_epoch = self.num_docs if self.copies is None else int(self.copies.sum())
        self.fingerprint = cache_key(
            {"files": files} | ({"upsample_long": self.upsample} if self.copies is not None else {})
        )
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._packs: dict[tuple[int, int], np.ndarray] = {}  # (epoch, seq_length) -> bounds

    def metadata(self) -> dict[str, DatasetMeta | None]:
        """``"{key} ({prefix})"`` -> the prefix's metadata sidecar (None: written without one)."""
        return {f"{self.key} ({p})": ds.meta for p, ds in zip(self.prefixes, self._datasets, strict=True)}

    def max_token_id(self) -> tuple[int, str]:
        """(largest token id, the prefix holding it) over this stream's files: from each prefix's
        metadata sidecar, else one pass over its ``.bin`` the first time, cached on disk afterwards
        (keyed by the files' fingerprint)."""
        best, where = -1, self.prefixes[0]
        for prefix, ds in zip(self.prefixes, self._datasets, strict=True):
            if ds.meta is not None:
                if ds.meta.max_token_id > best:
                    best, where = ds.meta.max_token_id, prefix
                continue

            def scan(prefix=prefix, ds=ds) -> np.ndarray:
                t0 = time.perf_counter()
                tokens = ds.tokens
                top = int(tokens.max()) if len(tokens) else -1
                log.info(
                    "dataset %r: scanned %s tokens of %s for the largest id in %.1fs",
                    self.name,
                    f"{len(tokens):,}",
                    prefix,
                    time.perf_counter() - t0,
                )
                return np.array([top], dtype=np.int64)

            key = cache_key({"file": ds.fingerprint})
            top = int(self.cache.get(prefix, self.name, key, "maxid", scan)[0])
            if top > best:
                best, where = top, prefix
        return best, where

    # --- per-epoch index -------------------------------------------------------------
    def _key(self, epoch: int, **extra) -> str:
        return cache_key(
            {"data": self.fingerprint, "name": self.name, "seed": self.seed, "epoch": epoch, "shuffle": self.shuffle}
            | extra
        )

    def epoch_index(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative token offsets [num_docs + 1]) of ``epoch``."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a stream moves forward: keep the current and the next epoch
                del self._epochs[min(self._epochs)]
            if not self.shuffle:
                order = np.arange(self.num_docs, dtype=np.int64)
                cum = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
            else:
                key = self._key(epoch)
                order = self.cache.get(self.prefixes[0], self.name, key, "order", lambda: self._build_order(epoch))
                cum = self.cache.get(
                    self.prefixes[0],
                    self.name,
                    key,
                    "cum",
                    lambda: np.concatenate([[0], np.cumsum(self.lengths[order], dtype=np.int64)]),
                )
            self._epochs[epoch] = (order, cum)
            if epoch > 0 and self.shuffle:
                log.info("dataset %r: epoch %d begins (its documents again, reshuffled)", self.name, epoch)
        return self._epochs[epoch]

    def _build_order(self, epoch: int) -> np.ndarray:
        """The epoch's documents shuffled (an up-sampled document's copies spread through it)."""
        name_key = zlib.crc32(self.name.encode())
        rng = np.random.default_rng([self.seed, name_key, epoch])
        dtype = np.int32 if self.num_docs < 2**31 else np.int64
        if self.copies is None:
            return rng.permutation(self.num_docs).astype(dtype)
        docs = np.repeat(np.arange(self.num_docs, dtype=dtype), self.copies)
        return docs[rng.permutation(len(docs))]

    def pack_bounds(self, epoch: int, seq_length: int) -> np.ndarray:
        """``by_source`` pack start offsets within ``epoch`` (plus its end) for sequences of
        ``seq_length``."""
        if (epoch, seq_length) not in self._packs:
            if len(self._packs) >= 2:  # the current and the next epoch, or the lengths either side of a stage change
                del self._packs[min(self._packs)]
            order, _ = self.epoch_index(epoch)
            capacity = seq_length + 1
            self._packs[epoch, seq_length] = self.cache.get(
                self.prefixes[0],
                self.name,
                self._key(epoch, capacity=capacity),
                "packs",
                lambda: greedy_pack_boundaries(self.lengths[order], capacity),
            )
        return self._packs[epoch, seq_length]

    # --- samples -----------------------------------------------------------------------
    def sample_span(self, position: int, packing: str, seq_length: int) -> tuple[int, int]:
        """(tokens, position advance) of the sample of ``seq_length`` that starts at ``position``."""
        if packing == "concat":
            return seq_length + 1, seq_length
        epoch, offset = divmod(position, self.tokens_per_epoch)
        bounds = self.pack_bounds(epoch, seq_length)
        end = int(bounds[np.searchsorted(bounds, offset, side="right")])
        return end - offset, end - offset

    def read(self, position: int, length: int) -> Window:
        """Tokens ``[position, position + length)`` of the stream, with document starts."""
        out = np.empty(length, dtype=np.int64)
        starts: list[int] = []
        filled = 0
        while filled < length:
            epoch, offset = divmod(position + filled, self.tokens_per_epoch)
            order, cum = self.epoch_index(epoch)
            i = int(np.searchsorted(cum, offset, side="right")) - 1
            while filled < length and i < len(order):
                doc_start = int(cum[i])
                within = offset - doc_start
                if within == 0:
                    starts.append(filled)
                take = min(int(cum[i + 1]) - offset, length - filled)
                out[filled : filled + take] = self._doc_tokens(int(order[i]), within, take)
                filled += take
                offset += take
                i += 1
        return Window(out, np.asarray(starts, dtype=np.int64))

    def length_histogram(self, edges: list[int]) -> dict[str, list[float]]:
        """Share of this stream's tokens per document-length bucket (``edges``: ascending bucket
        starts after 0), once per document (``natural``) and per epoch with up-sampling
        (``epoch``): what the length-aware mixing changed."""
        bucket = np.searchsorted(np.asarray(edges), self.lengths, side="right")
        tokens = self.lengths.astype(np.float64)
        natural = np.bincount(bucket, weights=tokens, minlength=len(edges) + 1)
        weighted = tokens * (self.copies if self.copies is not None else 1)
        epoch = np.bincount(bucket, weights=weighted, minlength=len(edges) + 1)
        return {"natural": (natural / natural.sum()).tolist(), "epoch": (epoch / epoch.sum()).tolist()}

    def read_document(self, doc: int, length: int | None = None) -> np.ndarray:
        """The first ``length`` tokens (all: None) of document ``doc`` in file order."""
        n = int(self.lengths[doc]) if length is None else length
        return self._doc_tokens(doc, 0, n)

    def _doc_tokens(self, doc: int, offset: int, length: int) -> np.ndarray:
        k = int(np.searchsorted(self._starts, doc, side="right")) - 1
        local = self._first_doc[k] + doc - int(self._starts[k])
        return self._datasets[k].get(local, offset=offset, length=length)
