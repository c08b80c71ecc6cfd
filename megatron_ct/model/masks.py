"""Attention masks built on the compute device from per-token document (segment) ids.

Packed sequences with ``reset_attention_mask`` carry ``segment_ids [b, s]``; megatron-core's
local attention wants a dense boolean ``[b, 1, s, s]`` mask (True = masked). Building it
here, on the device the model runs on, keeps the host-to-device copy at ``[b, s]``.
"""

from __future__ import annotations

import torch


def document_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Causal and block-diagonal over documents: ``[b, s]`` ids -> ``[b, 1, s, s]`` bool, True = masked."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).triu_(1)  # [s, s]: key after query
    other_doc = segment_ids[:, :, None] != segment_ids[:, None, :]  # [b, s, s]
    return (causal[None] | other_doc).unsqueeze(1)
