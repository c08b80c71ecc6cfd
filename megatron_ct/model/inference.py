"""Forward-only logits and per-token NLL at any TP/PP/CP, through megatron-core's schedules.

Used to check converted checkpoints against Hugging Face, to inspect a model, and to score
text (``megatron_ct/evaluation/bpb.py``). The batch
goes through ``get_forward_backward_func(forward_only=True)`` exactly as training batches
do (same pipeline schedule and P2P shapes), and the TP-split logits are gathered on the
last pipeline stage. Under context parallelism the rows are right-padded to a multiple of
``2 * CP`` (causal attention: padding changes no earlier position), each CP rank runs its two
chunks of every row, and the outputs are gathered back into sequence order.
"""

from __future__ import annotations

import torch


def _micro_batches(model_chunks, tokens: torch.Tensor, micro_batch_size: int | None):
    """``tokens [b, ...]`` split into micro-batches on the model's device."""
    b = tokens.shape[0]
    mbs = micro_batch_size or b
    if b % mbs:
        raise ValueError(f"batch of {b} sequences is not a multiple of micro_batch_size={mbs}")
    device = next(model_chunks[0].parameters()).device
    return mbs, [tokens[i : i + mbs].to(device) for i in range(0, b, mbs)]


def _context_parallel():
    """(CP size, CP rank, CP group) of this process."""
    from megatron.core import parallel_state as ps

    cp = ps.get_context_parallel_world_size()
    return cp, ps.get_context_parallel_rank(), ps.get_context_parallel_group() if cp > 1 else None


def _pad_to(tokens: torch.Tensor, width: int) -> torch.Tensor:
    if tokens.shape[1] == width:
        return tokens
    return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], width - tokens.shape[1])], dim=1)


def _cp_width(s: int, cp: int) -> int:
    """``s`` rounded up to a multiple of ``2 * cp``."""
    return -(-s // (2 * cp)) * (2 * cp)


def _run_forward_only(model_chunks, micro: list[torch.Tensor], forward_step, seq_length: int, mbs: int):
    """megatron-core's schedule, forward only, collecting ``forward_step``'s non-loss outputs:
    concatenated on the last pipeline stage, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model_chunks:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in model_chunks] if len(model_chunks) > 1 else iter(micro),
            model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
            num_microbatches=len(micro),
            seq_length=seq_length,
            micro_batch_size=mbs,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(list(outputs), dim=0)


def forward_logits(
    model_chunks: list[torch.nn.Module], tokens: torch.Tensor, vocab_size: int, micro_batch_size: int | None = None
) -> torch.Tensor | None:
    """Logits ``[b, s, vocab_size]`` (fp32, padding columns dropped) for ``tokens`` ``[b, s]``.

    Collective over the model-parallel group: every rank passes the same tokens. Returns the
    logits on every rank of the last pipeline stage and None on the others.
    """
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_ct.parallel.context import gather_sequence_values, shard_sequence

    s = tokens.shape[1]
    cp, cp_rank, cp_group = _context_parallel()
    width = _cp_width(s, cp)
    mbs, micro = _micro_batches(model_chunks, _pad_to(tokens, width), micro_batch_size)

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        positions = torch.arange(width, device=ids.device).unsqueeze(0).expand_as(ids)
        ids, positions = (shard_sequence(t, 1, cp, cp_rank) for t in (ids, positions))
        # No labels: GPTModel returns this TP rank's logits [b, s / cp, padded_vocab / tp].
        output = model(input_ids=ids, position_ids=positions, attention_mask=None)

        def gather(output_tensor, non_loss_data=True):
            full = gather_from_tensor_model_parallel_region(output_tensor)  # [b, s / cp, padded_vocab]
            if cp > 1:
                full = gather_sequence_values(full, 1, cp_group)
            return full[:, :s, :vocab_size].float()

        return output, gather

    return _run_forward_only(model_chunks, micro, forward_step, width, mbs)


def forward_token_nll(
    model_chunks: list[torch.nn.Module], tokens: torch.Tensor, micro_batch_size: int | None = None
) -> torch.Tensor | None:
    """Next-token NLL (nats, fp32) ``[b, s - 1]`` of ``tokens`` ``[b, s]``: entry ``t`` is
    ``-log p(tokens[:, t + 1] | tokens[:, :t + 1])``.

    The model computes the loss itself (megatron-core's vocab-parallel cross entropy on each
    TP rank's slice of the logits, padding columns masked), so the full ``[b, s, V]`` logits
    are never gathered. Collective over the model-parallel group like
    :func:`forward_logits`; returns the NLL on the last pipeline stage and None elsewhere.
    """
    from megatron_ct.parallel.context import gather_sequence_values, shard_sequence

    s = tokens.shape[1] - 1  # inputs tokens[:, :-1], labels tokens[:, 1:]
    cp, cp_rank, cp_group = _context_parallel()
    width = _cp_width(s, cp)
    mbs, micro = _micro_batches(model_chunks, _pad_to(tokens, width + 1), micro_batch_size)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)  # [mbs, width + 1]
        ids, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        positions = torch.arange(width, device=ids.device).unsqueeze(0).expand_as(ids)
        ids, labels, positions = (shard_sequence(t, 1, cp, cp_rank) for t in (ids, labels, positions))
        # With labels GPTModel returns the per-token loss [mbs, width / cp] on the last stage.
        output = model(input_ids=ids, position_ids=positions, attention_mask=None, labels=labels)

        def keep(output_tensor, non_loss_data=True):
            if cp > 1:
                output_tensor = gather_sequence_values(output_tensor, 1, cp_group)
            return output_tensor[:, :s].float()

        return output, keep

    return _run_forward_only(model_chunks, micro, forward_step, width, mbs)
