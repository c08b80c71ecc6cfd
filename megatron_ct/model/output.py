"""The output layer's logits and the language-model loss.

Two things live here, because both are about the ``[s, b, V/tp]`` logits:

- the padded vocabulary: the output layer has ``padded_vocab_size`` rows (a multiple of
  ``make_vocab_size_divisible_by`` x TP); the padding columns of the logits are set to -inf
  so they take no part in the softmax, and the loss equals Hugging Face's at every TP;
- the loss path: megatron-core's (full logits, then its vocab-parallel cross-entropy), or a
  chunked one (:mod:`megatron_ct.model.chunked_loss`) that never holds all the logits.
"""

from __future__ import annotations

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


def loss_model_class(loss_chunk_size: int | None, true_vocab_size: int):
    """The GPTModel class to build: megatron-core's (plain loss path) or the chunked-loss one.

    The result takes GPTModel's constructor arguments.
    """
    from megatron.core.models.gpt import GPTModel

    if loss_chunk_size is None:
        return GPTModel
    import functools

    from megatron_ct.model.chunked_loss import ChunkedLossGPTModel

    return functools.partial(ChunkedLossGPTModel, loss_chunk_size=loss_chunk_size, true_vocab_size=true_vocab_size)
