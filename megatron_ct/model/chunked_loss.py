"""Output layer + vocabulary-parallel cross-entropy without holding all ``[s, b, V/tp]`` logits.

megatron-core's path computes the whole ``[s, b, V/tp]`` logits, then its vocab-parallel
cross-entropy keeps an FP32 softmax of the same size for the backward pass: with a 150k
vocabulary at 8k tokens per micro-batch that is ~4.9 GB per copy. Here:

- forward: the logits are computed ``chunk`` sequence positions at a time; per token only
  the (global) max, the sum of exponentials and the target logit are kept;
- backward: the logits are recomputed one slice of the vocabulary at a time for all tokens,
  turned into the softmax gradient with the kept statistics, and consumed at once by the two
  GEMMs (``d hidden += d logits @ W[slice]``, ``d W[slice] = d logits^T @ hidden``). Each
  slice holds about as many logits as a forward chunk. The weight gradient of every row is one
  GEMM over all tokens, as in the plain path; only ``d hidden`` is summed over slices (FP32).

Cost: one extra output-layer GEMM (the recompute), ``[s, b]`` statistics, and under sequence
parallelism the gathered ``[s, b, h]`` input kept for the backward (ColumnParallelLinear
re-gathers it instead). The arithmetic per element follows megatron-core's
``_VocabParallelCrossEntropy`` (same max, same ``exp(l - max) / sum``, same order of the target
subtraction and the upstream scaling), so losses and gradients equal the plain path's up to
the GEMMs' blocking; the padded-vocabulary columns are filled with -inf as the plain path's hook does.

TP: the statistics are reduced over the tensor-parallel group (max per chunk; the sums and
target logits once at the end); the input passes through megatron-core's region functions,
so its gradient is all-reduced (or reduce-scattered under sequence parallelism) exactly as
``ColumnParallelLinear`` does it.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from megatron_ct.model.output import fill_padded_vocab_


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """``hidden [s, b, h]``, ``weight [V/tp, h]``, ``labels [s, b]`` -> per-token loss ``[s, b]`` (FP32)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, vocab_start, true_vocab_size, group):
        s, b, _ = hidden.shape
        local_vocab = weight.shape[0]
        stats = dict(dtype=torch.float32, device=hidden.device)
        logits_max = torch.empty(s, b, **stats)  # global max per token
        sum_exp = torch.empty(s, b, **stats)  # this rank's sum of exp(l - global max)
        target_logit = torch.empty(s, b, **stats)  # raw target logit, 0 where another rank holds it
        in_range = (labels >= vocab_start) & (labels < vocab_start + local_vocab)  # [s, b]
        local_target = torch.where(in_range, labels - vocab_start, 0)
        tp = dist.get_world_size(group) > 1
        for a in range(0, s, chunk):
            z = min(a + chunk, s)
            logits = torch.matmul(hidden[a:z], weight.t())  # [c, b, V/tp], as ColumnParallelLinear
            fill_padded_vocab_(logits, vocab_start, true_vocab_size)
            logits = logits.float()
            m = logits.max(dim=-1)[0]  # [c, b]
            if tp:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            logits_max[a:z] = m
            picked = logits.gather(-1, local_target[a:z].unsqueeze(-1)).squeeze(-1)
            target_logit[a:z] = torch.where(in_range[a:z], picked, 0.0)
            logits -= m.unsqueeze(-1)
            torch.exp(logits, out=logits)
            sum_exp[a:z] = logits.sum(dim=-1)
            del logits
        if tp:
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(target_logit, group=group)
        loss = torch.log(sum_exp) - (target_logit - logits_max)
        ctx.save_for_backward(hidden, weight, labels, logits_max, sum_exp)
        ctx.vocab_start, ctx.true_vocab_size = vocab_start, true_vocab_size
        # Vocabulary slices of the backward: about as many logits as one forward chunk.
        ctx.vocab_chunk = max(1, math.ceil(local_vocab * min(chunk, s) / s))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, logits_max, sum_exp = ctx.saved_tensors
        s, b, h = hidden.shape
        n = s * b
        hidden_2d = hidden.reshape(n, h)
        grad_2d = grad_loss.reshape(n, 1).float()
        max_2d, sum_2d = logits_max.reshape(n, 1), sum_exp.reshape(n, 1)
        target = labels.reshape(n) - ctx.vocab_start
        grad_hidden = torch.zeros(n, h, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.empty_like(weight)
        for a in range(0, weight.shape[0], ctx.vocab_chunk):
            z = min(a + ctx.vocab_chunk, weight.shape[0])
            logits = torch.matmul(hidden_2d, weight[a:z].t())  # [n, vc]
            fill_padded_vocab_(logits, ctx.vocab_start + a, ctx.true_vocab_size)
            softmax = logits.float()
            softmax -= max_2d
            torch.exp(softmax, out=softmax)
            softmax.div_(sum_2d)
            rows = ((target >= a) & (target < z)).nonzero().squeeze(-1)
            softmax[rows, target[rows] - a] -= 1.0
            softmax.mul_(grad_2d)
            d_logits = softmax.to(hidden.dtype)  # [n, vc]
            del logits, softmax
            grad_weight[a:z] = d_logits.t().matmul(hidden_2d)
            grad_hidden += d_logits.matmul(weight[a:z]).float()
        return grad_hidden.to(hidden.dtype).view(s, b, h), grad_weight, None, None, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int,
    true_vocab_size: int,
    sequence_parallel: bool,
) -> torch.Tensor:
    """Per-token loss ``[b, s]`` of ``hidden [s(/tp), b, h]`` against ``labels [b, s]``.

    ``weight`` is this TP rank's ``[V/tp, h]`` slice of the output layer (rows
    ``rank * V/tp ...``). Equal to GPTModel's ``compute_language_model_loss(labels,
    output_layer(hidden))`` with the padded-vocabulary mask.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    group = parallel_state.get_tensor_model_parallel_group()
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)  # [s, b, h]
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden)  # identity; all-reduces the gradient
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    labels_sb = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
    loss = _ChunkedVocabParallelCrossEntropy.apply(
        hidden, weight, labels_sb, chunk, vocab_start, true_vocab_size, group
    )
    return loss.transpose(0, 1).contiguous()  # [b, s]


_POSTPROCESS = inspect.signature(GPTModel._postprocess)


class ChunkedLossGPTModel(GPTModel):
    """megatron-core's GPTModel whose training loss goes through :func:`chunked_lm_loss`.

    Everything else (logits without labels, pipeline stages without the output layer,
    multi-token prediction, inference) is megatron-core's own ``_postprocess``.
    """

    def __init__(self, *args, loss_chunk_size: int, true_vocab_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_chunk_size = loss_chunk_size
        self.true_vocab_size = true_vocab_size

    def _postprocess(self, *args, **kwargs):
        # megatron-core calls this with keywords; bind so a positional call works too.
        a = _POSTPROCESS.bind(self, *args, **kwargs).arguments
        plain = (
            not self.post_process
            or a.get("labels") is None
            or a.get("mtp_in_postprocess")
            or self.config.mtp_num_layers
            or a.get("inference_context") is not None
            or a.get("inference_params") is not None
            or a.get("output_processor") is not None  # megatron-core >= 0.19's own output hook
            or getattr(self.config, "use_mup", False)  # megatron-core >= 0.19 scales logits (MuP)
            or self.output_layer.bias is not None
        )
        if plain:
            return super()._postprocess(*args, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if weight is None:
            weight = self.output_layer.weight
        return chunked_lm_loss(
            a["hidden_states"],
            weight,
            a["labels"],
            self.loss_chunk_size,
            self.true_vocab_size,
            sequence_parallel=self.output_layer.sequence_parallel,
        )
