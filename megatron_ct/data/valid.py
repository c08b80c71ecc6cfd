"""Named validation sets: fixed windows of whole documents, and their size in bytes.

Each evaluation of a set scores the same text: its first documents (in file order, not
shuffled) that fit ``eval_iters * global_batch_size`` windows of ``seq_length`` predicted
tokens, concatenated and cut into ``concat`` windows, the last one padded (no loss there).
With a tokenizer the stream starts with one EOD token, so the first document's first token
is predicted too and *every* token of the chosen documents is scored exactly once.

Bits per byte: ``sum of token losses (nats) / ln 2 / bytes``, where bytes is the UTF-8 length
of the detokenized documents (``data.tokenizer``; EOD renders as nothing), which is the
original text for lossless tokenizers (SentencePiece with byte fallback, byte-level BPE).
Runs with different tokenizers therefore compare on the same text. The byte count is
computed once (rank 0 first) and cached with the data indices.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from megatron_ct.config.schema import DataConfig, DatasetConfig
from megatron_ct.data.batches import sample_indices, to_device
from megatron_ct.data.index_cache import IndexCache, cache_key, rank0_first
from megatron_ct.data.packing import PackingOptions, build_batch
from megatron_ct.data.stream import DocumentStream, Window

log = logging.getLogger("megatron_ct")


class ValidationSet:
    """Windows and byte count of one named validation set."""

    def __init__(
        self,
        name: str,
        cfg: DatasetConfig,
        data: DataConfig,
        *,
        global_batch_size: int,
        cache: IndexCache,
        tokenizer=None,
    ) -> None:
        self.name = name
        self.seq_length = s = data.seq_length
        self.global_batch = global_batch_size
        self.eval_iters = data.eval_iters
        self.stream = DocumentStream(
            name,
            cfg,
            key=f"data.valid.{name}",
            seed=0,
            cache=cache,
            data_root=data.data_root,
            shuffle=False,
        )
        self.tokenizer = tokenizer
        self.lead_eod = tokenizer.eod_id if tokenizer is not None else None
        lead = 1 if tokenizer is not None else 0
        self.num_windows = data.eval_iters * global_batch_size
        budget = self.num_windows * s + 1 - lead  # document tokens that fit
        _, cum = self.stream.epoch_index(0)
        self.num_docs = int(np.searchsorted(cum, budget, side="right")) - 1
        self.doc_tokens = int(cum[self.num_docs]) if self.num_docs else min(budget, int(cum[1]))
        self.length = self.doc_tokens + lead  # tokens of the evaluated stream
        self.predicted_tokens = self.length - 1
        self.bytes: int | None = None
        if tokenizer is not None:
            key = cache_key({"data": self.stream.fingerprint, "tokenizer": tokenizer.name, "tokens": self.doc_tokens})
            self.bytes = int(
                rank0_first(
                    lambda: cache.get(self.stream.prefixes[0], f"valid-{name}", key, "bytes", self._count_bytes)
                )[0]
            )
        if self.num_docs == 0:
            log.warning("validation set %r: its first document is longer than the eval budget; it is truncated", name)

    def _count_bytes(self) -> np.ndarray:
        total = 0
        remaining = self.doc_tokens
        for doc in range(max(self.num_docs, 1)):
            n = min(int(self.stream.lengths[doc]), remaining)
            total += len(self._decode(doc, n).encode("utf-8"))
            remaining -= n
        return np.array([total], dtype=np.int64)

    def _decode(self, doc: int, n: int) -> str:
        return self.tokenizer.decode(self.stream.read_document(doc, n).tolist())

    def _window(self, index: int) -> Window:
        s = self.seq_length
        start, end = index * s, min(index * s + s + 1, self.length)
        if start >= end:
            return Window(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        lead = 0 if self.lead_eod is None else 1
        if lead and start == 0:
            body = self.stream.read(0, end - 1)
            return Window(np.concatenate([[self.lead_eod], body.tokens]).astype(np.int64), body.doc_starts + 1)
        return self.stream.read(start - lead, end - start)

    def microbatches(self, it: int, dp_rank: int, mbs: int, layout) -> Iterator[dict]:
        """This rank's micro-batches of evaluation step ``it`` (same layout as training)."""
        for j in range(layout.num_microbatches):
            idx = sample_indices(it * self.global_batch, j, dp_rank, mbs, layout.dims.dp)
            batch = build_batch([self._window(i) for i in idx], self.seq_length, PackingOptions())
            yield to_device(batch, layout.device)


def build_validation_sets(data: DataConfig, global_batch_size: int, cache: IndexCache, tokenizer=None):
    """Every ``data.valid`` entry; bits per byte need the data's ``tokenizer`` (``data.tokenizer``)."""
    if not data.valid:
        return []
    if tokenizer is None:
        log.info("data.tokenizer is not set: validation reports loss per token but not bits per byte")
    return [
        ValidationSet(name, ds, data, global_batch_size=global_batch_size, cache=cache, tokenizer=tokenizer)
        for name, ds in data.valid.items()
    ]
