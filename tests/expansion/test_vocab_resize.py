"""vocab_resize: old rows bit-identical, new rows per init method, padding, ties."""

from __future__ import annotations

import pytest
import torch

from megatron_ct.expansion.vocab.resize import (
    VocabResizePlan,
    resize_embeddings,
    resize_vocab_matrix,
)

V_OLD, V_OLD_PADDED, H = 250, 256, 16  # 250 real tokens, padded to 128 * TP2


def old_matrix(dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(V_OLD_PADDED, H, generator=gen) * 0.3 + 0.1).to(dtype)  # [V_old_padded, h]


def plan(init: str = "subword_mean", **kwargs) -> VocabResizePlan:
    # 40 new tokens with 1-4 source pieces each, one with no pieces (falls back to the mean).
    sources = tuple(tuple((j * 7 + k * 13) % V_OLD for k in range(1 + j % 4)) for j in range(39)) + ((),)
    return VocabResizePlan(old_vocab_size=V_OLD, sources=sources, init=init, **kwargs)


@pytest.mark.parametrize("init", ["subword_mean", "mean", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_old_rows_are_bit_identical_and_sizes_are_padded(init, dtype):
    old, p = old_matrix(dtype), plan(init, divisible_by=128)
    new = resize_vocab_matrix(old, p, tp=2)
    assert p.new_vocab_size == 290 and new.shape == (512, H) and new.dtype == dtype  # 290 -> 2 * 128 * 2
    assert torch.equal(new[:V_OLD], old[:V_OLD])
    mean_row = old[:V_OLD].double().mean(0)
    torch.testing.assert_close(new[p.new_vocab_size :].double(), mean_row.expand(512 - 290, -1).to(dtype).double())


def test_subword_mean_rows_are_means_of_their_old_pieces():
    old, p = old_matrix(), plan()
    new = resize_vocab_matrix(old, p)
    for j, ids in enumerate(p.sources):
        expected = old[list(ids)].double().mean(0) if ids else old[:V_OLD].double().mean(0)
        torch.testing.assert_close(new[V_OLD + j].double(), expected, rtol=0, atol=1e-6)


def test_mean_and_random_init():
    old = old_matrix()
    mean = resize_vocab_matrix(old, plan("mean", divisible_by=1))
    torch.testing.assert_close(mean[V_OLD:], old[:V_OLD].mean(0).expand(40, -1), rtol=0, atol=1e-6)

    rnd = resize_vocab_matrix(old, plan("random", divisible_by=1, seed=3))
    new_rows = rnd[V_OLD:]
    assert new_rows.mean().abs() < 0.1  # zero-mean, not the old rows' mean of 0.1
    assert abs(new_rows.std().item() - old[:V_OLD].std().item()) < 0.05
    assert torch.equal(rnd, resize_vocab_matrix(old, plan("random", divisible_by=1, seed=3)))
    assert not torch.equal(rnd, resize_vocab_matrix(old, plan("random", divisible_by=1, seed=4)))


def test_tied_embeddings_stay_one_tensor():
    emb, out = old_matrix(), old_matrix() * 2
    for tied in (None, emb):
        new_emb, new_out = resize_embeddings(emb, tied, plan())
        assert new_emb is new_out
    new_emb, new_out = resize_embeddings(emb, out, plan())
    assert torch.equal(new_out[:V_OLD], out[:V_OLD]) and torch.equal(new_out[V_OLD:], 2 * new_emb[V_OLD:])


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"sources\[1\] \(new id 11\) has ids \[10\] outside the old vocabulary"):
        VocabResizePlan(old_vocab_size=10, sources=((1,), (10,)))
    with pytest.raises(ValueError, match=r"init 'zeros' \(plan.init\): expected one of subword_mean, mean, random"):
        VocabResizePlan(old_vocab_size=10, sources=(), init="zeros")
    with pytest.raises(ValueError, match=r"vocab matrix has shape \(5, 16\); expected \[rows >= old vocab size 250"):
        resize_vocab_matrix(torch.zeros(5, H), plan())
