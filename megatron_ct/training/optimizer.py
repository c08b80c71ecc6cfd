"""Wrap model chunks in megatron-core DDP and build its optimizer (param groups per freeze policy).

Two end-of-step computations are ours rather than megatron-core's, because its versions
bring values to the host (a GPU sync each) when Transformer Engine and apex are absent:
the gradient norm (:func:`grad_norm`: one sync, the result) and the per-token gradient
scaling in :func:`finalize_grads` (megatron-core tests ``num_tokens > 0`` on the host).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_ct.config import Layout, OptimConfig
from megatron_ct.model.llama import params_dtype
from megatron_ct.training.freeze import FreezePlan, RowScaling

GROUP_KEY = "ct_group"


def wrap_ddp(chunks: list[torch.nn.Module], layout: Layout) -> list[torch.nn.Module]:
    """megatron-core DistributedDataParallel: contiguous FP32 grad buffers, bucketed
    all-reduce (or reduce-scatter with the distributed optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=layout.overlap_grad_reduce,
        use_distributed_optimizer=layout.use_distributed_optimizer,
        # We check the gradient norm ourselves and apply train.nan_policy.
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(
            config=get_model_config(chunk),
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's buffer is bucketed, as in Megatron-LM: the others
            # reduce at the end of the step.
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]


def _identify_groups_by_policy() -> None:
    """megatron-core (0.16) re-matches a checkpoint's param groups to the current ones by
    ``(wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)`` only, so two of our groups that
    differ only in their freeze policy would load as one. The policy key joins that identity.
    Idempotent; groups of ours always carry the key (every trained parameter has a policy)."""
    from megatron.core.optimizer import distrib_optimizer, optimizer

    for module in (optimizer, distrib_optimizer):
        if GROUP_KEY not in module.param_group_identifier_keys:
            module.param_group_identifier_keys = (*module.param_group_identifier_keys, GROUP_KEY)


def build_optimizer(
    optim: OptimConfig, layout: Layout, ddp_chunks, plan: FreezePlan, *, precision: str, clip_grad: float
):
    """AdamW with FP32 master weights (and dynamic loss scaling in fp16); one param group per
    freeze policy, each split by megatron-core's no-decay rule for norms and biases."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=params_dtype(precision),
        initial_loss_scale=optim.initial_loss_scale,
        clip_grad=clip_grad,
        use_distributed_optimizer=layout.use_distributed_optimizer,
    )
    _identify_groups_by_policy()
    overrides = get_standard_config_overrides(opt_config)  # no weight decay on norms and biases
    overrides.update(plan.param_overrides())
    # On CPU every group is already gloo: megatron-core's extra gloo copies of the data-parallel
    # groups would only add idle threads (megatron_ct/parallel/distributed.py).
    optimizer = get_megatron_optimizer(
        opt_config, ddp_chunks, config_overrides=overrides, use_gloo_process_groups=layout.on_gpu
    )
    if layout.device.type == "cpu":
        _use_fused_cpu_adam(optimizer)
    RowScaling(plan, optimizer)  # old vs appended vocabulary rows at different rates (step hooks)
    return optimizer


def _use_fused_cpu_adam(optimizer) -> None:
    """On CPU megatron-core falls back to ``torch.optim.AdamW`` with its per-tensor Python loop
    (about ten dispatches per parameter); torch's fused CPU kernel does one pass per tensor with
    the same update rule. Set per group, as ``step()`` reads it (torch >= 2.4)."""
    from torch.optim import Adam, AdamW

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) in (Adam, AdamW):
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)
            inner.defaults.update(fused=True, foreach=False)


def grad_norm(optimizer) -> float:
    """Global L2 norm of the gradients the optimizer steps on, over all model-parallel ranks (and
    data-parallel ones with the distributed optimizer): megatron-core's ``get_grad_norm``, with
    the per-tensor norms kept on the device until the one ``.item()``."""
    total = None
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        grads = opt.get_main_grads_for_grad_norm()
        if grads:
            square = torch.stack(torch._foreach_norm(grads)).float().square().sum()  # [] fp32 on the device
        else:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            square = torch.zeros((), dtype=torch.float32, device=device)
        dist.all_reduce(square, group=opt.get_grad_stats_parallel_group())
        total = square if total is None else total + square
    return math.sqrt(total.item()) if total is not None else 0.0  # the step's host sync


def clip_grads_(optimizer, total_norm: float) -> None:
    """Scale the gradients by ``clip_grad / total_norm`` where that is below 1: megatron-core's
    ``clip_grad_by_total_norm_fp32`` (the same coefficient and gradients), as one in-place
    ``_foreach_mul_``; without apex or Transformer Engine, megatron-core's fallback writes
    ``grad * coeff`` into a new tensor per parameter and copies it back."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if opt.config.clip_grad <= 0.0:
            continue
        coeff = opt.config.clip_grad / (total_norm + 1.0e-6)
        if coeff >= 1.0:
            continue
        grads = [p.grad.detach() for p in opt.get_parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coeff)


def finalize_grads(model: list[torch.nn.Module], num_tokens: torch.Tensor | None = None, **kwargs) -> None:
    """megatron-core's end-of-step gradient finalisation (DP reduce, SP norm reduce, tied
    embeddings), then the per-token scaling ``1 / global tokens`` without a host round trip."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, None, **kwargs)
    if num_tokens is None:
        return
    pp_group = ps.get_pipeline_model_parallel_group()
    dist.broadcast(num_tokens, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
    dist.all_reduce(num_tokens, group=ps.get_data_parallel_group(with_context_parallel=True))
    scaling = 1.0 / num_tokens.clamp(min=1)  # no tokens: the gradients are zero anyway
    for chunk in model:
        chunk.scale_gradients(scaling)


def hook_model_config(ddp_chunks: list[torch.nn.Module], optimizer) -> None:
    """Give the pipeline schedules what they call back into: grad-sync control, the
    end-of-step gradient finalisation (DP reduce, SP norm reduce, per-token scaling,
    tied-embedding sync) and the fp16 loss scale."""
    from megatron.core.utils import get_model_config

    config = get_model_config(ddp_chunks[0])
    no_sync = [c.no_sync for c in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if ddp_chunks[0].ddp_config.overlap_grad_reduce:
        sync = [c.start_grad_sync for c in ddp_chunks]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    config.finalize_model_grads_func = finalize_grads
    config.grad_scale_func = optimizer.scale_loss
