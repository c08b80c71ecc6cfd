"""Wrap model chunks in megatron-core DDP and build its optimizer and LR scheduler."""

from __future__ import annotations

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ct.config import CTConfig
from megatron_ct.model.llama import params_dtype


class FrozenAwareScheduler(OptimizerParamScheduler):
    """megatron-core's scheduler, except that groups with peak LR 0 (parameters frozen by
    train.trainable_params) stay at 0, also during a warmup from a non-zero lr_warmup_init."""

    def get_lr(self, param_group: dict) -> float:
        if param_group.get("max_lr", self.max_lr) == 0.0:
            return 0.0
        return super().get_lr(param_group)

    def get_wd(self, param_group: dict | None = None) -> float:
        if param_group is not None and param_group.get("ct_no_decay"):
            return 0.0
        return super().get_wd(param_group)


def wrap_ddp(cfg: CTConfig, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """megatron-core DistributedDataParallel: contiguous FP32 grad buffers, bucketed
    all-reduce (or reduce-scatter with the distributed optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # We check loss and grad norm ourselves and apply train.nan_policy.
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


def build_optimizer(cfg: CTConfig, ddp_chunks: list[torch.nn.Module], extra_overrides: dict | None = None):
    """AdamW with FP32 master weights (and dynamic loss scaling in fp16)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, t = cfg.optim, cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        params_dtype=params_dtype(t.precision),
        initial_loss_scale=o.initial_loss_scale,
        clip_grad=t.clip_grad,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(opt_config)  # no weight decay on norms and biases
    # Parameters frozen by train.trainable_params but kept in the optimizer (freeze.py).
    overrides[ParamKey(attr="ct_frozen")] = ParamGroupOverride(max_lr=0.0, min_lr=0.0, wd_mult=0.0)
    # Vocabulary matrices whose old rows are frozen (freeze.py): decay would move those rows.
    overrides[ParamKey(attr="ct_rows_from")] = ParamGroupOverride(wd_mult=0.0)
    overrides.update(extra_overrides or {})  # e.g. per-stage freeze classes (freeze.StageFreezer)
    return get_megatron_optimizer(opt_config, ddp_chunks, config_overrides=overrides)


def build_scheduler(cfg: CTConfig, optimizer):
    """megatron-core's OptimizerParamScheduler: warmup, then constant/linear/cosine/WSD.

    ``override_opt_param_scheduler`` makes the config win over a checkpoint's stored
    schedule on resume (only the step count is taken from the checkpoint), so a CT
    recipe can change its schedule between job chunks.
    """
    o = cfg.optim
    decay_iters = max(o.lr_decay_iters or cfg.train.train_iters, o.lr_warmup_iters + 1)
    wsd = o.lr_wsd_decay_iters if o.lr_wsd_decay_iters is not None else max(1, decay_iters // 10)
    return FrozenAwareScheduler(
        optimizer,
        init_lr=o.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=decay_iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=wsd,
        lr_wsd_decay_style=o.lr_wsd_decay_style,
    )


def hook_model_config(ddp_chunks: list[torch.nn.Module], optimizer) -> None:
    """Give the pipeline schedules what they call back into: grad-sync control, the
    end-of-step gradient finalisation (DP reduce, SP norm reduce, per-token scaling,
    tied-embedding sync) and the fp16 loss scale."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(ddp_chunks[0])
    no_sync = [c.no_sync for c in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if ddp_chunks[0].ddp_config.overlap_grad_reduce:
        sync = [c.start_grad_sync for c in ddp_chunks]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
