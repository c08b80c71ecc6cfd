"""Context parallelism on our attention path: the layout, the errors, and CP2/CP4 against CP1.

The model-level runs (tests/parallel/cp_worker.py) compare per-token losses and every parameter
gradient of one forward/backward at CP2 and CP4 with CP1, with and without packed documents;
the trainer-level ones (tests/training/test_parallel_parity.py) compare per-step losses with
TP and PP combined.
"""

from pathlib import Path

import pytest
import torch

from megatron_ct.errors import ConfigError
from megatron_ct.parallel.context import (
    _to_global_order,
    check_sequence_length,
    chunk_ids,
    shard_batch,
    shard_sequence,
)

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shards_are_head_tail_chunks_and_gather_restores_the_order(cp):
    s = 8 * cp
    t = torch.arange(s).view(1, s)
    parts = [shard_sequence(t, 1, cp, r) for r in range(cp)]
    chunk = s // (2 * cp)
    for r, part in enumerate(parts):
        first, last = chunk_ids(cp, r)
        assert (first, last) == (r, 2 * cp - 1 - r)
        expected = list(range(first * chunk, (first + 1) * chunk)) + list(range(last * chunk, (last + 1) * chunk))
        assert part[0].tolist() == expected
    # Every rank gets the same causal work: its two chunks' key counts add up to 2 cp + 1 chunks.
    assert {(r + 1) + (2 * cp - r) for r in range(cp)} == {2 * cp + 1}
    assert torch.equal(_to_global_order(parts, 1), t)


def test_shard_batch_cuts_sequence_fields_only_and_refuses_dense_masks():
    batch = {
        "tokens": torch.arange(16).view(2, 8),
        "segment_ids": torch.zeros(2, 8, dtype=torch.long),
        "n": torch.ones(3),
    }
    part = shard_batch(batch, 2, 1)
    assert part["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert part["segment_ids"].shape == (2, 4) and torch.equal(part["n"], batch["n"])
    with pytest.raises(ValueError, match="segment_ids"):
        shard_batch({**batch, "attention_mask": torch.zeros(2, 1, 8, 8, dtype=torch.bool)}, 2, 0)


def test_sequence_length_must_split_into_2cp_chunks():
    check_sequence_length(48, 4)
    with pytest.raises(
        ConfigError, match=r"data.seq_length: expected a multiple of 2 \* parallel.context_parallel_size = 8"
    ):
        check_sequence_length(36, 4)


def test_config_errors_for_unsupported_combinations():
    from megatron_ct.config import load_config, validate_for_world
    from megatron_ct.model.attention import choose_attention_backend

    base = ["parallel.context_parallel_size=2", "data.seq_length=30", "parallel.device=cpu"]
    with pytest.raises(ConfigError, match=r"^data.seq_length: expected a multiple of 2 \* .* = 4 .*got 30$"):
        validate_for_world(load_config(None, base), 2)
    with pytest.raises(ConfigError, match="data.downstream_tasks: expected none under context parallelism"):
        validate_for_world(load_config(None, [*base[:1], "data.seq_length=32", "data.downstream_tasks=[x.yaml]"]), 2)
    with pytest.raises(ConfigError, match="model.attention_backend: expected sdpa, flex or te under context"):
        choose_attention_backend("local", "local", torch.device("cpu"), False, cp=2)
    assert choose_attention_backend("auto", "local", torch.device("cpu"), True, cp=2) == "sdpa"
    with pytest.raises(ConfigError, match="divisor of the world size 2"):
        validate_for_world(
            load_config(None, [*base[:1], "data.seq_length=32", "parallel.tensor_model_parallel_size=2"]), 2
        )


def _run(tmp_path, cp: int, *overrides: str) -> dict:
    from launch import run_torchrun

    out = tmp_path / f"cp{cp}-{len(overrides)}"
    out.mkdir()
    run_torchrun(cp, HERE / "cp_worker.py", [str(out), *overrides], timeout=300)
    return torch.load(out / "result.pt")


@pytest.mark.slow
def test_cp2_and_cp4_losses_and_gradients_equal_cp1(tmp_path):
    ref = _run(tmp_path, 1)
    # The documents change the result, so the masks were applied and the comparison can fail.
    assert (ref["none"]["losses"] - ref["segments"]["losses"]).abs().max().item() > 1e-3
    for cp in (2, 4):
        got = _run(tmp_path, cp)
        for mask in ("none", "segments"):
            want, have = ref[mask], got[mask]
            assert max(g.abs().max().item() for g in want["grads"].values()) > 1e-3  # not all zero
            assert have["losses"].shape == want["losses"].shape
            assert (have["losses"] - want["losses"]).abs().max().item() <= 1e-5, (cp, mask)
            assert have["grads"].keys() == want["grads"].keys()
            worst = max((have["grads"][n] - want["grads"][n]).abs().max().item() for n in want["grads"])
            assert worst <= 1e-5, (cp, mask, worst)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("c", [0, 2])
def test_one_chunk_equals_full_attention_blockwise_and_masked(dtype, documents, c):
    """A query chunk over its key prefix: the CPU block-by-block kernel and the mask path both
    equal plain SDPA with the full causal (document) mask, values and gradients."""
    import torch.nn.functional as F

    from megatron_ct.parallel.context import _ChunkAttentionCPU, prefix_mask

    torch.manual_seed(0)
    b, heads, groups, chunk, d = 2, 8, 2, 16, 32
    end = (c + 1) * chunk
    q = torch.randn(b, heads, chunk, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, groups, end, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, groups, end, d, dtype=dtype, requires_grad=True)
    seg = torch.zeros(b, end, dtype=torch.long)
    seg[0, 10:] = 1  # documents crossing the chunk boundary, one starting inside the last chunk
    seg[0, end - 6 :] = 2
    seg[1, end - chunk + 1 :] = 1  # a row of this chunk sees no earlier key: its first block is empty
    seg_q, seg_k = (seg[:, c * chunk :], seg) if documents else (None, None)
    q_pos, k_pos = torch.arange(c * chunk, end), torch.arange(end)
    allowed = (k_pos[None] <= q_pos[:, None])[None, None]
    if documents:
        allowed = allowed & (seg_q[:, :, None] == seg_k[:, None, :])[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=True)
    weights = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.equal(prefix_mask(c, chunk, seg_q, seg_k, q.device).expand_as(allowed), allowed)
    out = _ChunkAttentionCPU.apply(q, k, v, c, chunk, seg_q, seg_k, 0.3)
    assert (out - ref).abs().max().item() <= tol
    for got, want in zip(torch.autograd.grad((out * weights).sum(), (q, k, v)), ref_grads, strict=True):
        assert (got - want).abs().max().item() <= tol
