"""The padded-vocabulary mask of the output layer's logits, and the plain path's cross-entropy
(megatron-core's, bit for bit, without its argmax and one-rank collectives)."""

import pytest
import torch

from megatron_ct.model.output import _vocab_parallel_cross_entropy, fill_padded_vocab_


def loss_and_grads(h, w, labels, mask):
    """megatron-core's vocab-parallel cross-entropy of ``h @ w.T`` with the padding masked by ``mask``."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logits = torch.matmul(h, w.t())  # [s, b, V] as ColumnParallelLinear computes it
    logits = mask(logits)
    loss = vocab_parallel_cross_entropy(logits, labels)  # [s, b]
    (loss * torch.rand_like(loss, generator=torch.Generator().manual_seed(0))).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_fill_is_bit_identical_to_masked_fill(mcore_tp1, seeded, dtype):
    s, b, hidden, true_vocab, padded = 16, 2, 32, 100, 128
    h = torch.randn(s, b, hidden).to(dtype)
    w = torch.randn(padded, hidden).to(dtype)
    labels = torch.randint(0, true_vocab, (s, b))
    cols = torch.arange(padded) >= true_vocab

    def out_of_place(logits):  # what the hook did before: a copy forward and backward
        return logits.masked_fill(cols, float("-inf"))

    def in_place(logits):
        assert fill_padded_vocab_(logits, 0, true_vocab)
        return logits

    ref = loss_and_grads(h, w, labels, out_of_place)
    got = loss_and_grads(h, w, labels, in_place)
    for name, a, e in zip(("loss", "d hidden", "d weight"), got, ref, strict=True):
        assert torch.equal(a, e), name
    assert torch.all(got[2][true_vocab:] == 0)  # padding rows never learn


def test_fill_only_touches_this_ranks_padding_columns():
    logits = torch.zeros(3, 2, 64)  # one TP rank's slice [s, b, V/tp]
    assert not fill_padded_vocab_(logits, vocab_start=0, true_vocab_size=100)  # rank 0 of 2: no padding
    assert fill_padded_vocab_(logits, vocab_start=64, true_vocab_size=100)  # rank 1: columns 36.. are padding
    assert torch.isinf(logits[..., 36:]).all() and (logits[..., :36] == 0).all()
    whole = torch.zeros(2, 64)
    assert fill_padded_vocab_(whole, vocab_start=128, true_vocab_size=100)  # a rank with padding only
    assert torch.isinf(whole).all()


def test_cross_entropy_equals_megatron_core_bit_for_bit(mcore_tp1, seeded):
    logits = torch.randn(64, 2, 1000) * 4
    logits[..., 990:] = float("-inf")  # padding columns
    target = torch.randint(0, 990, (64, 2))
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    # Both compute the softmax in their input, in place: give each a fresh non-leaf tensor.
    loss_ours = _vocab_parallel_cross_entropy(ours * 1.0, target)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    loss_theirs = vocab_parallel_cross_entropy(theirs * 1.0, target)
    grad = torch.rand(64, 2)
    loss_ours.backward(grad)
    loss_theirs.backward(grad)
    assert torch.equal(loss_ours, loss_theirs)
    assert torch.equal(ours.grad, theirs.grad)
    assert torch.isfinite(loss_ours).all()
