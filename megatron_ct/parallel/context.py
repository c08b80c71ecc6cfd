"""Context parallelism (CP) on megatron-ct's own attention path, without Transformer Engine.

megatron-core's context parallelism lives in Transformer Engine's attention only (its
``DotProductAttention`` asserts ``context_parallel_size == 1``). This module is the CP of the
``sdpa`` and ``flex`` attention backends, on any device and process-group backend (gloo on CPU
included); with the ``te`` backend megatron-core's TE path is used instead.

Layout (the one megatron-core and TE use, so checkpoints, RoPE and the pipeline's message
shapes agree with them): the sequence of ``s`` tokens is cut into ``2 * cp`` chunks of
``s / (2 cp)``, and CP rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r``, in that order. Under
causal attention an early chunk is cheap and a late one expensive, so every rank gets the
same amount of work (the "head-tail" or zigzag load balance). :func:`shard_batch` cuts a
batch this way (tokens, labels, loss mask, positions, document ids); megatron-core's rotary
embedding cuts its angle table the same way (``get_pos_emb_on_this_cp_rank``), so each token
keeps its global RoPE position.

Attention (:func:`context_parallel_attention`): the keys and values of all CP ranks are
all-gathered (the "all-gather KV" form of ring attention that Llama 3 trained with; the
backward reduce-scatters their gradients), and each local query chunk attends to the keys up
to its own end: chunk ``c`` to the first ``(c + 1)`` chunks, causal on the diagonal block,
and within its document where the batch packs several (segment ids gathered alongside). On
CPU the chunk runs block by block on the flash kernel with log-sum-exp merging
(:class:`_ChunkAttentionCPU`), so plain causal attention builds no mask; elsewhere through
the backend's kernel with a ``[chunk, prefix]`` boolean mask (:func:`prefix_mask`). The
result is the same attention as without CP, to floating-point summation order. Memory: each
rank keeps every layer's gathered keys and values for the backward (``[b, groups, s,
head_dim]`` twice; small beside the other activations under GQA) and its own queries' scores
only (``bench/bench_cp.py`` measures it).

The sequence-length rule (``s`` divisible by ``2 cp``) is checked where the config is built
(:func:`check_sequence_length`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_ct.errors import ConfigError

# The batch fields laid out [b, s]; everything else in a batch is left as it is.
SEQUENCE_FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")


def check_sequence_length(seq_length: int, cp: int, key: str = "data.seq_length") -> None:
    """Raise ConfigError unless ``seq_length`` splits into ``2 * cp`` equal chunks."""
    if cp > 1 and seq_length % (2 * cp) != 0:
        raise ConfigError(
            f"{key}: expected a multiple of 2 * parallel.context_parallel_size = {2 * cp} "
            f"(each CP rank holds two equal chunks), got {seq_length}"
        )


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two global chunks (of ``2 * cp_size``) that CP rank ``cp_rank`` holds, in order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def shard_sequence(t: torch.Tensor, dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This CP rank's part of ``t`` along ``dim`` (length divisible by ``2 * cp_size``)."""
    if cp_size == 1:
        return t
    s = t.shape[dim]
    if s % (2 * cp_size):
        raise ValueError(f"context parallelism: sequence length {s} is not divisible by 2 * CP = {2 * cp_size}")
    chunks = t.chunk(2 * cp_size, dim=dim)
    first, last = chunk_ids(cp_size, cp_rank)
    return torch.cat((chunks[first], chunks[last]), dim=dim)


def shard_batch(batch: dict[str, torch.Tensor], cp_size: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """This CP rank's part of a ``[b, s]`` batch (a dense ``[b, 1, s, s]`` mask is refused:
    under CP documents travel as segment ids)."""
    if cp_size == 1:
        return batch
    mask = batch.get("attention_mask")
    if mask is not None:
        raise ValueError(
            "context parallelism: a dense attention_mask cannot be split by sequence; send segment_ids [b, s]"
        )
    return {k: shard_sequence(v, 1, cp_size, cp_rank) if k in SEQUENCE_FIELDS else v for k, v in batch.items()}


def _uses_gloo(group) -> bool:
    return dist.get_backend(group) == dist.Backend.GLOO


def _gather_local_parts(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _to_global_order(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Per-rank ``[chunk r, chunk 2cp-1-r]`` parts -> the sequence in global chunk order."""
    cp = len(parts)
    halves = [p.chunk(2, dim=dim) for p in parts]
    ordered = [halves[c][0] for c in range(cp)] + [halves[2 * cp - 1 - c][1] for c in range(cp, 2 * cp)]
    return torch.cat(ordered, dim=dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather a CP-sharded tensor along ``dim`` into global order; the backward sums the
    gradient of every rank and returns this rank's two chunks of it (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _to_global_order(_gather_local_parts(t, group), dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dim, group = ctx.dim, ctx.group
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        # [cp, ...]: row r holds the gradient of rank r's chunks, as that rank lays them out.
        per_rank = torch.stack([shard_sequence(grad, dim, cp, r) for r in range(cp)])
        if _uses_gloo(group):  # gloo has no reduce-scatter
            dist.all_reduce(per_rank, group=group)
            return per_rank[rank].clone(), None, None
        out = torch.empty_like(per_rank[rank])
        dist.reduce_scatter_tensor(out, per_rank.contiguous(), group=group)
        return out, None, None


def gather_sequence(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Differentiable all-gather of a CP-sharded tensor along ``dim``, in global order."""
    return _GatherSequence.apply(t, dim, group)


def gather_sequence_values(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather without a gradient (document ids, per-token losses), in global order."""
    return _to_global_order(_gather_local_parts(t.detach(), group), dim)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _blocks(c: int, chunk: int, seg_q: torch.Tensor | None, seg_k: torch.Tensor | None, dtype: torch.dtype):
    """Key blocks of query chunk ``c``: (key slice, is_causal, additive mask or None, rows that
    see some key or None). The keys before the chunk are all visible to it (within its
    documents), the chunk's own block is causal; plain causal attention needs no mask at all."""
    out = []
    for start, end, diagonal in ((0, c * chunk, False), (c * chunk, (c + 1) * chunk, True)):
        if end == start:
            continue
        if seg_q is None:
            out.append((slice(start, end), diagonal, None, None))
            continue
        allowed = seg_q[:, :, None] == seg_k[:, None, start:end]  # [b, chunk, keys]
        if diagonal:
            allowed = allowed & torch.ones(chunk, chunk, dtype=torch.bool, device=seg_q.device).tril()
        out.append((slice(start, end), False, _additive_mask(allowed[:, None], dtype), allowed.any(-1)[:, None]))
    return out


class _ChunkAttentionCPU(torch.autograd.Function):
    """One query chunk over its key prefix on the CPU flash kernel, block by block, with the
    blocks' log-sum-exps merged (ring attention's online softmax): no ``[chunk, prefix]``
    mask is built or saved for plain causal attention, only the query, the keys and values,
    the output and its log-sum-exp. The backward runs the kernel's backward per block with
    the merged output and log-sum-exp, which gives each block's exact share of the gradient."""

    @staticmethod
    def forward(ctx, q, k, v, c: int, chunk: int, seg_q, seg_k, scale: float):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        outs, lses = [], []
        for keys, causal, mask, seen in _blocks(c, chunk, seg_q, seg_k, q.dtype):
            o, lse = flash(q, k[:, :, keys], v[:, :, keys], 0.0, causal, attn_mask=mask, scale=scale)
            if seen is not None:  # the kernel gives a row with no visible key lse 0, output 0
                lse = lse.masked_fill(~seen, float("-inf"))
            outs.append(o.to(lse.dtype))  # merged in the kernel's lse dtype (FP32 for FP32/BF16)
            lses.append(lse)
        lse = torch.stack(lses).logsumexp(0)  # [b, heads, chunk]; finite: the diagonal is always seen
        out = sum(o * torch.exp(part - lse)[..., None] for o, part in zip(outs, lses, strict=True)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, seg_q, seg_k)
        ctx.c, ctx.chunk, ctx.scale = c, chunk, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, seg_q, seg_k = ctx.saved_tensors
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dq = torch.zeros_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for keys, causal, mask, _ in _blocks(ctx.c, ctx.chunk, seg_q, seg_k, q.dtype):
            gq, gk, gv = backward(
                grad_out.contiguous(),
                q,
                k[:, :, keys],
                v[:, :, keys],
                out,
                lse,
                0.0,
                causal,
                attn_mask=mask,
                scale=ctx.scale,
            )
            dq += gq
            dk[:, :, keys] += gk
            dv[:, :, keys] += gv
        return dq, dk, dv, None, None, None, None, None


def prefix_mask(c: int, chunk: int, seg_q, seg_k, device) -> torch.Tensor:
    """Boolean mask (True = attend) of query chunk ``c`` over the keys up to its end:
    ``[1, 1, chunk, (c + 1) chunk]``, or ``[b, 1, ...]`` within documents."""
    end = (c + 1) * chunk
    q_pos = torch.arange(c * chunk, end, device=device)
    allowed = (torch.arange(end, device=device)[None, :] <= q_pos[:, None])[None, None]
    if seg_q is not None:
        allowed = allowed & (seg_q[:, :, None] == seg_k[:, None, :end])[:, None]
    return allowed


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: torch.Tensor | None,
    group,
    scale: float,
    dropout: float,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Causal (and, with ``segment_ids``, per-document) attention of this CP rank's queries.

    ``q [b, heads, s_loc, d]``, ``k, v [b, groups, s_loc, d]`` in this rank's layout
    (chunks ``r`` and ``2 cp - 1 - r``); ``segment_ids [b, s_loc]`` or None. On CPU without
    dropout each chunk runs :class:`_ChunkAttentionCPU` (no mask for plain causal attention);
    elsewhere ``attend(q, k, v, allowed)``, the backend's kernel with a boolean mask
    ``[b or 1, 1, sq, sk]`` (True = attend), which builds a ``[chunk, prefix]`` mask per chunk:
    correct, but on GPU long contexts want the ``te`` backend. Returns ``[b, heads, s_loc, d]``.
    """
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    s_loc = q.shape[2]
    if s_loc % 2:
        raise ValueError(f"context parallelism: local sequence length {s_loc} is odd (expected two equal chunks)")
    chunk = s_loc // 2
    k_all = gather_sequence(k, 2, group)  # [b, groups, s, d]
    v_all = gather_sequence(v, 2, group)
    seg_all = gather_sequence_values(segment_ids, 1, group) if segment_ids is not None else None
    blockwise = q.device.type == "cpu" and dropout == 0.0
    outs = []
    for j, c in enumerate(chunk_ids(cp, rank)):
        q_c = q[:, :, j * chunk : (j + 1) * chunk]
        end = (c + 1) * chunk  # keys after this chunk's last query are never attended
        seg_q = segment_ids[:, j * chunk : (j + 1) * chunk] if segment_ids is not None else None
        if blockwise:
            seg_k = seg_all[:, :end] if seg_all is not None else None
            outs.append(
                _ChunkAttentionCPU.apply(q_c, k_all[:, :, :end], v_all[:, :, :end], c, chunk, seg_q, seg_k, scale)
            )
            continue
        allowed = prefix_mask(c, chunk, seg_q, seg_all[:, :end] if seg_all is not None else None, q.device)
        outs.append(attend(q_c, k_all[:, :, :end], v_all[:, :, :end], allowed))
    return torch.cat(outs, dim=2)
