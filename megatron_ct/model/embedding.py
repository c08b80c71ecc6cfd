"""The word embedding's weight gradient, accumulated straight into its DDP buffer.

megatron-core's embedding lookup (``F.embedding``) has autograd build a dense ``[V, h]`` weight
gradient per micro-batch (zero-filled, rows added), which DDP's hook then adds to the buffer:
two passes over a vocabulary-sized tensor for a few thousand rows. Where the linear layers
accumulate into the DDP buffers (``gradient_accumulation_fusion``, CPU training runs), the
embedding does the same here: the backward adds the rows into ``weight.main_grad`` and marks
it, as megatron-core's linear layers do (measured -1.4% of a CPU step at the benchmark shape).

Only for an untied embedding on one TP rank without sequence-parallel scattering; everything
else is megatron-core's forward unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        rows = grad.reshape(-1, grad.shape[-1]).to(weight.main_grad.dtype)
        weight.main_grad.index_add_(0, ids.reshape(-1), rows)
        weight.grad_added_to_main_grad = True  # DDP's hook then skips its add
        # A gradient must still reach the parameter, so DDP's hook runs (bucket bookkeeping);
        # its values are never read.
        return None, torch.empty_like(weight)


class AccumulatingVocabParallelEmbedding(VocabParallelEmbedding):
    """megatron-core's ``VocabParallelEmbedding`` whose weight gradient goes into the DDP buffer.

    Installed by :func:`accumulate_embedding_grads` only where that is exact (untied, one TP
    rank, no scattering); the forward checks only what can change after building: a weight
    with a DDP buffer that trains (otherwise megatron-core's forward, unchanged)."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not (w.requires_grad and hasattr(w, "main_grad")):
            return super().forward(input_)
        return _EmbeddingIntoMainGrad.apply(input_, w)


def accumulate_embedding_grads(model: torch.nn.Module) -> bool:
    """Make a built GPTModel's word embedding accumulate into the DDP buffer (see the module
    docstring); returns whether it applies: first stage, untied (a tied weight's DDP hook adds
    the sum of both gradients), one TP rank and no sequence-parallel scattering (no masking or
    reduction in the lookup)."""
    embedding = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if (
        type(embedding) is not VocabParallelEmbedding
        or getattr(model, "share_embeddings_and_output_weights", True)
        or embedding.tp_group.size() > 1
        or embedding.reduce_scatter_embeddings
    ):
        return False
    embedding.__class__ = AccumulatingVocabParallelEmbedding  # a subclass adding no state
    return True
