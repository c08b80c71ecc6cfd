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
and within its document where the batch packs several (segment ids gathered alongside). The
result is the same attention as without CP, to floating-point summation order. Memory: each
rank holds the full keys and values of one layer at a time (``[b, groups, s, head_dim]``,
small beside the activations under GQA), and its own queries' scores only.

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


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: torch.Tensor | None,
    group,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Causal (and, with ``segment_ids``, per-document) attention of this CP rank's queries.

    ``q [b, heads, s_loc, d]``, ``k, v [b, groups, s_loc, d]`` in this rank's layout
    (chunks ``r`` and ``2 cp - 1 - r``); ``segment_ids [b, s_loc]`` or None. ``attend(q, k, v,
    allowed)`` is the backend's kernel with a boolean mask ``[b or 1, 1, sq, sk]`` (True =
    attend). Returns ``[b, heads, s_loc, d]``.
    """
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    s_loc = q.shape[2]
    if s_loc % 2:
        raise ValueError(f"context parallelism: local sequence length {s_loc} is odd (expected two equal chunks)")
    chunk = s_loc // 2
    k_all = gather_sequence(k, 2, group)  # [b, groups, s, d]
    v_all = gather_sequence(v, 2, group)
    seg_all = gather_sequence_values(segment_ids, 1, group) if segment_ids is not None else None
    outs = []
    for j, c in enumerate(chunk_ids(cp, rank)):
        q_c = q[:, :, j * chunk : (j + 1) * chunk]
        end = (c + 1) * chunk  # keys after this chunk's last query are never attended
        q_pos = torch.arange(c * chunk, end, device=q.device)
        k_pos = torch.arange(end, device=q.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, chunk, end]
        if seg_all is not None:
            seg_q = segment_ids[:, j * chunk : (j + 1) * chunk]
            same = seg_q[:, :, None] == seg_all[:, None, :end]  # [b, chunk, end]
            allowed = allowed & same[:, None]
        outs.append(attend(q_c, k_all[:, :, :end], v_all[:, :, :end], allowed))
    return torch.cat(outs, dim=2)
