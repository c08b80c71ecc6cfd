"""The chunked output-layer + cross-entropy (model.loss_chunk_size) equals megatron-core's plain path.

Function level: against ``ColumnParallelLinear``'s GEMM + padded-vocabulary fill + megatron-core's
``vocab_parallel_cross_entropy`` (fp32 and bf16). Model level (tests/model/parity_worker.py under
torchrun): per-token losses and every parameter gradient at TP1, TP2, TP2 with sequence
parallelism, and tied embeddings; and a short training run with the same losses.
"""

import json
from pathlib import Path

import pytest
import torch

from megatron_ct.config import load_config
from megatron_ct.errors import ConfigError
from megatron_ct.model.chunked_loss import chunked_lm_loss
from megatron_ct.model.output import fill_padded_vocab_

HERE = Path(__file__).resolve().parent


def plain(hidden, weight, labels, true_vocab):
    """megatron-core's path: full logits [s, b, V], the padding filled, vocab-parallel CE -> [b, s]."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = torch.matmul(hidden, weight.t())
    fill_padded_vocab_(logits, 0, true_vocab)
    return vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t().contiguous()


def run(fn, hidden, weight, labels, upstream):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels)
    loss.backward(upstream)
    return loss.detach(), h.grad, w.grad


def tensors(dtype, s=24, b=2, h=32, vocab=100, padded=128):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(s, b, h, generator=g).to(dtype)  # [s, b, h]
    weight = (torch.randn(padded, h, generator=g) * 0.5).to(dtype)  # [V, h]
    labels = torch.randint(0, vocab, (b, s), generator=g)  # [b, s]
    upstream = torch.rand(b, s, generator=g)  # d(total)/d(per-token loss), e.g. a loss mask
    return hidden, weight, labels, upstream


@pytest.mark.parametrize("chunk", [1, 5, 8, 24, 100])
def test_equal_to_plain_path_fp32(mcore_tp1, chunk):
    hidden, weight, labels, upstream = tensors(torch.float32)
    ref = run(lambda h, w, y: plain(h, w, y, 100), hidden, weight, labels, upstream)
    got = run(lambda h, w, y: chunked_lm_loss(h, w, y, chunk, 100, False), hidden, weight, labels, upstream)
    for name, a, e in zip(("loss", "d hidden", "d weight"), got, ref, strict=True):
        if chunk >= 24:  # one chunk and one vocabulary slice: the same operations, bit for bit
            assert torch.equal(a, e), name
        # Otherwise d hidden is a sum over up to 100 vocabulary slices in FP32: its round-off is
        # bounded by ~100 x eps x the largest entry (measured: 7e-7 at entries up to 1.65; a fixed
        # atol of 1e-6 failed once in CI when the GEMM kernel summed in another order).
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()), msg=name)
    assert torch.all(got[2][100:] == 0)  # padding rows get no gradient


def test_equal_to_plain_path_bf16(mcore_tp1):
    hidden, weight, labels, upstream = tensors(torch.bfloat16)
    ref = run(lambda h, w, y: plain(h, w, y, 100), hidden, weight, labels, upstream)
    got = run(lambda h, w, y: chunked_lm_loss(h, w, y, 6, 100, False), hidden, weight, labels, upstream)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-6)  # FP32 loss from the same bf16 logits
    # Gradients: bf16 GEMMs; d hidden is summed over vocabulary slices in FP32 (at most a rounding apart).
    torch.testing.assert_close(got[1], ref[1], rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(got[2], ref[2], rtol=2**-7, atol=1e-3)


def test_config_refuses_a_bad_chunk_size():
    for bad in ("0", "-3"):
        with pytest.raises(ConfigError, match=r"^model\.loss_chunk_size: expected a positive integer"):
            load_config(None, [f"model.loss_chunk_size={bad}"])
    assert load_config(None, ["model.loss_chunk_size=512"]).model.loss_chunk_size == 512


# ----------------------------------------------------------------------------- model level


def run_worker(tmp_path, nproc: int, *overrides: str) -> list[dict]:
    from launch import run_torchrun

    run_torchrun(nproc, HERE / "parity_worker.py", ["loss", str(tmp_path), *overrides], timeout=600)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def check_loss_results(results: list[dict]) -> None:
    for r in results:
        for chunk in (1, 16, 20, 48, 64):
            assert r[f"chunk{chunk}_loss"] <= 1e-5 * r["loss_mean"], (chunk, r)
            assert r[f"chunk{chunk}_grads"] <= 1e-5 * r["grad_scale"], (chunk, r)
            assert r[f"chunk{chunk}_logits"] == 0.0, (chunk, r)  # no labels: megatron-core's own path
        # The whole sequence in one chunk is the plain path's arithmetic.
        assert r["chunk48_loss"] == r["chunk64_loss"] == 0.0, r


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_model_losses_and_grads_equal_plain_tp1(tmp_path, tied):
    check_loss_results(run_worker(tmp_path, 1, f"model.untie_embeddings_and_output_weights={not tied}"))


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True])
def test_model_losses_and_grads_equal_plain_tp2(tmp_path, sp):
    check_loss_results(run_worker(tmp_path, 2, f"parallel.sequence_parallel={sp}"))


@pytest.mark.slow
def test_training_losses_equal_plain(tmp_path):
    """Through DDP, the optimizer and a padded vocabulary: the same losses step by step."""
    from launch import losses, run_trainer

    start = ["train.train_iters=3"]  # one seed, one layout: the same initial weights
    run_trainer(1, [*start, f"logging.log_dir={tmp_path / 'plain'}"])
    run_trainer(1, [*start, "model.loss_chunk_size=5", f"logging.log_dir={tmp_path / 'chunked'}"])
    plain_losses, chunked = losses(tmp_path / "plain"), losses(tmp_path / "chunked")
    assert sorted(chunked) == [1, 2, 3]
    assert chunked == pytest.approx(plain_losses, rel=1e-5)
    assert plain_losses[3] < plain_losses[1]  # the weights moved
