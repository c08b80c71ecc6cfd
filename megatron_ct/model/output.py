"""The output layer's logits and the language-model loss.

Two things live here, because both are about the ``[s, b, V/tp]`` logits:

- the padded vocabulary: the output layer has ``padded_vocab_size`` rows (a multiple of
  ``make_vocab_size_divisible_by`` x TP); the padding columns of the logits are set to -inf
  so they take no part in the softmax, and the loss equals Hugging Face's at every TP;
- the loss path: the full logits, then megatron-core's vocab-parallel cross-entropy (with the
  two changes of :class:`PlainLossGPTModel`), or a chunked one
  (:mod:`megatron_ct.model.chunked_loss`) that never holds all the logits.
"""

from __future__ import annotations

import functools

import torch


def fill_padded_vocab_(logits: torch.Tensor, vocab_start: int, true_vocab_size: int) -> bool:
    """Set the padding columns of this TP rank's ``logits [..., V/tp]`` to -inf, in place.

    ``vocab_start`` is the global vocabulary index of column 0. Runs under ``no_grad``: the
    fill is not recorded by autograd, and it need not be. The cross-entropy's gradient at a
    -inf logit is exactly 0 (its softmax is 0 and the label never points at padding), which
    is what an out-of-place ``masked_fill`` would have returned through its backward, so
    losses and gradients are bit-identical, without copying the logits forward and back.
    Returns whether anything was filled.
    """
    local = logits.shape[-1]
    first_pad = true_vocab_size - vocab_start  # local index of the first padding column
    if first_pad >= local:
        return False
    with torch.no_grad():
        logits[..., max(first_pad, 0) :].fill_(float("-inf"))
    return True


def mask_padded_vocab(model: torch.nn.Module, true_vocab_size: int) -> None:
    """Give the padding columns of the model's logits a value of -inf (forward hook).

    Each TP rank holds a contiguous slice of the output layer's rows; only the rank(s) whose
    slice reaches past ``true_vocab_size`` have anything to fill.
    """
    from megatron.core import parallel_state

    def hook(module, inputs, output):
        logits, _ = output  # [s, b, padded_vocab / tp]
        start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
        fill_padded_vocab_(logits, start, true_vocab_size)
        # Returning None keeps the output: the same tensor, now with the padding filled.

    model.output_layer.register_forward_hook(hook)


def _vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss ``[s, b]`` of ``logits [s, b, V/tp]`` (changed in place) and ``target [s, b]``."""
    return _cross_entropy_function().apply(logits, target)


@functools.cache
def _cross_entropy_function():
    """megatron-core's vocab-parallel cross-entropy, bit for bit, made cheaper in two places:
    the per-token maximum is ``amax`` (megatron-core's ``max`` also computes the argmax it drops:
    3.6x the time on CPU), and no collective runs over a one-rank TP group. The backward, and
    the helpers that compute the target logits and the softmax in place, are megatron-core's
    (the same names, arguments and saved tensors in 0.16.1 and 0.19.2)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy, _VocabParallelCrossEntropy
    from megatron.core.tensor_parallel.utils import VocabUtility

    class _Function(_VocabParallelCrossEntropy):
        @staticmethod
        def forward(ctx, logits, target):
            group = ps.get_tensor_model_parallel_group()
            tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
            logits = logits.float()  # as megatron-core: the softmax is computed in this tensor, in place
            logits_max = logits.amax(dim=-1)
            if tp > 1:
                dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
            start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(logits.shape[-1], rank, tp)
            mask, target_1d, predicted, sum_exp, exp_logits = VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target, logits_max, start, end
            )
            if tp > 1:
                dist.all_reduce(predicted, group=group)
                dist.all_reduce(sum_exp, group=group)
            softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
            ctx.label_smoothing, ctx.vocab_size = 0.0, softmax.shape[-1]
            ctx.save_for_backward(softmax, mask, target_1d)
            return loss

        @staticmethod
        def backward(ctx, grad_output):
            return _VocabParallelCrossEntropy.backward(ctx, grad_output)[:2]

    return _Function


@functools.cache
def plain_loss_gpt_model():
    """GPTModel whose loss is :func:`_vocab_parallel_cross_entropy` (same values and gradients)."""
    from megatron.core.models.gpt import GPTModel

    class PlainLossGPTModel(GPTModel):
        def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            if self.config.cross_entropy_loss_fusion:
                return super().compute_language_model_loss(labels, logits)
            loss = _vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous())  # [s, b]
            return loss.transpose(0, 1).contiguous()  # [b, s]

    return PlainLossGPTModel


def loss_model_class(loss_chunk_size: int | None, true_vocab_size: int):
    """The GPTModel class to build: the plain loss path or the chunked-loss one.

    The result takes GPTModel's constructor arguments.
    """
    if loss_chunk_size is None:
        return plain_loss_gpt_model()
    from megatron_ct.model.chunked_loss import ChunkedLossGPTModel

    return functools.partial(ChunkedLossGPTModel, loss_chunk_size=loss_chunk_size, true_vocab_size=true_vocab_size)
