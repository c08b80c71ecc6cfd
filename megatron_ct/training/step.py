"""One optimizer step: forward/backward through megatron-core's schedules, then the update.

The update is megatron-core's ``ChainedOptimizer.step`` split open so the loss and the
gradient norm can be checked *before* any weight changes: a NaN/Inf is reported with
the step and either skipped or stops the run (``train.nan_policy``), never applied.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Raised with nan_policy=stop when a step's loss or grad norm is NaN/Inf."""


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token losses ``[b, s]`` -> (sum, token count, report) in megatron-core's
    per-token convention: finalize_model_grads divides gradients by the global count."""
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """megatron-core forward_step_func: run the chunk, return its output and loss closure."""
    batch = next(data_iterator)
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )
    return output, partial(loss_func, batch["loss_mask"])


def reduce_loss_sums(reports: list[dict], device: str) -> tuple[float, float]:
    """(loss sum, token count) of the global batch, identical on every rank.

    Reports exist on the last pipeline stage only; they are summed over data-parallel
    ranks there, then broadcast along each pipeline so all stages see the value (and
    so take the same NaN decision).
    """
    from megatron.core import parallel_state as ps

    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    total = torch.zeros(2, dtype=torch.float64, device=dev)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for r in reports:
            total += r["lm loss"].to(total)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            total, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
    return total[0].item(), total[1].item()


def reduce_step_loss(reports: list[dict], device: str) -> float:
    """Token-weighted mean loss of the global batch, identical on every rank."""
    loss_sum, tokens = reduce_loss_sums(reports, device)
    return loss_sum / max(tokens, 1.0)


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    lr: float
    applied: bool
    reason: str = ""  # why a step was not applied: 'fp16 overflow', 'non-finite loss', ...


def train_step(
    step: int,
    microbatches: Iterator[dict],
    model_chunks,
    optimizer,
    scheduler,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    nan_policy: str,
    device: str,
) -> StepResult:
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()

    data = microbatches
    if len(model_chunks) > 1:
        # The interleaved schedule pulls from one iterator per chunk; every chunk of a
        # micro-batch must see the same batch.
        cached = list(microbatches)
        data = [iter(cached) for _ in model_chunks]
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    loss = reduce_step_loss(reports, device)
    # The scheduled LR: the largest over param groups (groups of frozen parameters sit at 0).
    lr = max(g["lr"] for g in scheduler.optimizer.param_groups)

    # --- the update, checked (megatron-core's ChainedOptimizer.step, opened up) ---
    if optimizer.prepare_grads():  # fp16 loss-scale overflow: megatron-core's normal skip
        return StepResult(loss, None, lr, applied=False, reason="fp16 overflow (loss scale lowered)")
    grad_norm = optimizer.get_grad_norm()  # global: reduced over all model-parallel ranks
    bad = [name for name, v in (("loss", loss), ("grad norm", grad_norm)) if not math.isfinite(v)]
    if bad:
        message = f"iteration {step + 1}: non-finite {' and '.join(bad)} (loss={loss}, grad_norm={grad_norm})"
        if nan_policy == "stop":
            raise NonFiniteError(message + "; stopping (train.nan_policy=stop)")
        return StepResult(loss, grad_norm, lr, applied=False, reason=message + "; update skipped")
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm)
    applied = optimizer.step_with_ready_grads()
    if applied:
        scheduler.step(increment=1)
    return StepResult(loss, grad_norm, lr, applied=applied)
