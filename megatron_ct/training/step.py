"""One optimizer step: forward/backward through megatron-core's schedules, then the update.

The update is megatron-core's ``ChainedOptimizer.step`` split open so the gradient norm can
be checked *before* any weight changes: a NaN/Inf is reported with the step and either
skipped or stops the run (``train.nan_policy``), never applied. A non-finite loss always
shows up as a non-finite gradient norm, which megatron-core computes (and brings to the host)
anyway: that is the step's one host sync. The loss itself stays on the device, summed over
the step's micro-batches; the trainer reduces it across ranks only on log steps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_ct.parallel.device import rewrites_suspended
from megatron_ct.training.optimizer import clip_grads_
from megatron_ct.training.optimizer import grad_norm as global_grad_norm


class NonFiniteError(RuntimeError):
    """Raised with nan_policy=stop when a step's gradient norm (or loss) is NaN/Inf."""


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token losses ``[b, s]`` -> (sum, token count, report) in megatron-core's
    per-token convention: finalize_model_grads divides gradients by the global count."""
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def _context_parallel_part(batch: dict) -> dict:
    """Under context parallelism every CP rank reads the whole batch and keeps its two chunks
    of each sequence (megatron_ct/parallel/context.py); the loss is then over its own tokens,
    and finalize_grads divides by the token count of the whole DP x CP group."""
    from megatron.core import parallel_state as ps

    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return batch
    from megatron_ct.parallel.context import shard_batch

    return shard_batch(batch, cp, ps.get_context_parallel_rank())


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """megatron-core forward_step_func: run the chunk, return its output and loss closure."""
    batch = _context_parallel_part(next(data_iterator))
    # Packed documents: per-token segment ids [b, s]; our attention modules attend causally
    # within each document (megatron_ct/model/attention.py), building any mask on the device.
    mask = batch.get("segment_ids", batch.get("attention_mask"))
    with rewrites_suspended():
        output = model(
            input_ids=batch["tokens"],
            position_ids=batch["position_ids"],
            attention_mask=mask,
            labels=batch["labels"],
        )
    return output, partial(loss_func, batch["loss_mask"])


def run_schedule(
    model_chunks,
    microbatches: Iterator[dict],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> list[dict]:
    """megatron-core's pipeline schedule over this rank's micro-batches; returns its loss reports."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data: Iterator[dict] | list[Iterator[dict]] = microbatches
    if len(model_chunks) > 1:
        # The interleaved schedule pulls from one iterator per chunk; every chunk of a
        # micro-batch must see the same batch. tee() keeps only those not yet seen by all.
        data = list(itertools.tee(microbatches, len(model_chunks)))
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def sum_reports(reports: list[dict], device: torch.device) -> torch.Tensor:
    """This rank's ``[loss sum, tokens]`` (float64, on the device; zeros off the last stage)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for r in reports:
        total += r["lm loss"].to(total)
    return total


def reduce_loss_sums(local: torch.Tensor) -> tuple[float, float]:
    """Collective: (loss sum, token count) of the global batch(es), identical on every rank.

    Reports exist on the last pipeline stage only; they are summed over data- and
    context-parallel ranks there (each CP rank reports its own tokens), then broadcast along
    each pipeline so all stages see the value.
    """
    from megatron.core import parallel_state as ps

    total = local.clone()
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            total, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
    loss_sum, tokens = total.tolist()  # host sync: log steps and evaluation only
    return loss_sum, tokens


@dataclass
class StepResult:
    applied: bool
    grad_norm: float | None  # None when fp16's loss scaler skipped the step before computing it
    loss_sums: torch.Tensor  # [2] this rank's (loss sum, tokens) on the device, not reduced
    lr: float  # the scheduled LR of this step (a multiplier-1 group's)
    reason: str = ""  # why a step was not applied: 'fp16 overflow', 'non-finite grad norm', ...


def train_step(
    iteration: int,
    microbatches: Iterator[dict],
    model_chunks,
    optimizer,
    scheduler,
    *,
    device: torch.device,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    nan_policy: str,
) -> StepResult:
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(
        model_chunks,
        microbatches,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    loss_sums = sum_reports(reports, device)
    lr = scheduler.scheduled_lr()

    # --- the update, checked (megatron-core's ChainedOptimizer.step, opened up) ---
    if optimizer.prepare_grads():  # fp16 loss-scale overflow: megatron-core's normal skip
        return StepResult(False, None, loss_sums, lr, "fp16 overflow (loss scale lowered)")
    grad_norm = global_grad_norm(optimizer)  # the step's host sync
    if not math.isfinite(grad_norm):
        loss_sum, tokens = reduce_loss_sums(loss_sums)  # rare: the message names the loss too
        loss = loss_sum / max(tokens, 1.0)
        message = f"iteration {iteration + 1}: non-finite grad norm (loss={loss}, grad_norm={grad_norm})"
        if nan_policy == "stop":
            raise NonFiniteError(message + "; stopping (train.nan_policy=stop)")
        return StepResult(False, grad_norm, loss_sums, lr, message + "; update skipped")
    clip_grads_(optimizer, grad_norm)
    applied = optimizer.step_with_ready_grads()
    if applied:
        scheduler.step(increment=1)
    return StepResult(applied, grad_norm, loss_sums, lr)
