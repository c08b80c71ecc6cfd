"""Samples (token windows with document starts) -> model inputs, per packing options.

A sample holds ``n <= seq_length + 1`` tokens; inputs are its first ``seq_length`` tokens,
labels the next ``seq_length`` (``[b, s]`` each). Positions at or past ``n`` are padding
(``by_source``): label 0, no loss. Each token gets a *segment* id, the document it belongs
to within the sample (padding is a segment of its own), from which:

- ``reset_position_ids``: positions count from 0 at every document start;
- ``reset_attention_mask``: the batch carries ``segment_ids [b, s]`` (int64); the attention
  modules (:mod:`megatron_ct.model.attention`) attend causally *and* block-diagonally over
  segments, so documents do not attend to each other: a block mask for FlexAttention, or the
  dense ``[b, 1, s, s]`` mask built on the device for SDPA and megatron-core's local attention.
  Only ``[b, s]`` ids cross the host-device link. Without the key the model is plainly causal.
  (RoPE is relative and megatron-core's ``GPTModel`` derives it from the sequence length, not
  from position ids, so a masked document computes what it computes alone.)
- ``eod_mask_loss``: no loss where the input is a document's last token and the label the
  next document's first (Megatron-LM masks inputs equal to EOD; with EOD appended to every
  document, as tools/preprocess_data.py does, this is the same set of positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_ct.data.stream import Window


@dataclass(frozen=True)
class PackingOptions:
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


def segment_ids(window: Window, total: int) -> np.ndarray:
    """Document index of each of ``total`` positions; padding (>= len(tokens)) is one more."""
    n = len(window.tokens)
    marks = np.zeros(total, dtype=np.int64)
    starts = window.doc_starts[window.doc_starts > 0]
    marks[starts] = 1
    seg = np.cumsum(marks)
    if n < total:
        seg[n:] = seg[n - 1] + 1 if n else 0
    return seg


def build_batch(windows: list[Window], seq_length: int, options: PackingOptions) -> dict[str, torch.Tensor]:
    """Stack samples into ``tokens/labels/loss_mask/position_ids [b, s]`` (+ ``segment_ids``), on the host."""
    b, s = len(windows), seq_length
    seqs = np.zeros((b, s + 1), dtype=np.int64)
    segs = np.zeros((b, s + 1), dtype=np.int64)
    loss_mask = np.zeros((b, s), dtype=np.float32)
    for r, w in enumerate(windows):
        n = len(w.tokens)
        seqs[r, :n] = w.tokens
        segs[r] = segment_ids(w, s + 1)
        loss_mask[r, : max(n - 1, 0)] = 1.0  # label position j + 1 must hold a real token
    if options.eod_mask_loss:
        loss_mask[segs[:, :-1] != segs[:, 1:]] = 0.0
    seg_in = segs[:, :-1]  # [b, s]: segment of each input position
    if options.reset_position_ids:
        # Index of each position minus the index where its segment starts.
        idx = np.broadcast_to(np.arange(s), (b, s))
        first = np.ones((b, s), dtype=bool)
        first[:, 1:] = seg_in[:, 1:] != seg_in[:, :-1]
        start_idx = np.maximum.accumulate(np.where(first, idx, 0), axis=1)
        position_ids = idx - start_idx
    else:
        position_ids = np.broadcast_to(np.arange(s), (b, s))
    batch = {
        "tokens": torch.from_numpy(seqs[:, :-1].copy()),
        "labels": torch.from_numpy(seqs[:, 1:].copy()),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(np.array(position_ids, dtype=np.int64)),  # writable copy
    }
    if options.reset_attention_mask:
        batch["segment_ids"] = torch.from_numpy(np.ascontiguousarray(seg_in))  # [b, s]
    return batch
