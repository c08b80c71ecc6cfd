"""LR re-warm at curriculum stage starts, on top of megatron-core's OptimizerParamScheduler.

A stage with ``lr_rewarm_iters: W`` starting at step ``k0`` scales the schedule's own LR
(whatever its warmup/decay says at that step) into a linear ramp:

    lr(k) = init + (base(k) - init) * (k - k0) / W      for k0 <= k < k0 + W

with ``init = optim.lr_warmup_init``, the same form as megatron-core's initial warmup. ``k``
is the scheduler's ``num_steps`` (applied optimizer steps, restored from the checkpoint), so
the LR of every step is a function of the config and the step: identical after a resume.
"""

from __future__ import annotations

import types

from megatron_ct.config import CTConfig


def rewarm_windows(cfg: CTConfig) -> list[tuple[int, int]]:
    """(start step, length) of every stage re-warm in the config."""
    if cfg.data.source != "indexed":
        return []
    from megatron_ct.data.schedule import Schedule

    schedule = Schedule(cfg.data, cfg.train.global_batch_size)
    return [(s.start_iter, s.lr_rewarm_iters) for s in schedule.stages if s.lr_rewarm_iters > 0]


def install_stage_rewarm(scheduler, windows: list[tuple[int, int]], init_lr: float) -> None:
    """Wrap ``scheduler.get_lr`` with the re-warm ramps and apply the LR of the current step.

    megatron-core's ``step()`` (and ``load_state_dict``, which steps to the saved count) asks
    ``self.get_lr(param_group)`` for each group; the instance attribute set here answers first.
    """
    if not windows:
        return
    base_get_lr = scheduler.get_lr

    def get_lr(self, param_group: dict) -> float:
        lr = base_get_lr(param_group)
        if param_group.get("max_lr", self.max_lr) == 0.0:
            return lr  # a group held at LR 0 (frozen parameters) stays there
        for start, length in windows:
            if start <= self.num_steps < start + length:
                return init_lr + (lr - init_lr) * (self.num_steps - start) / length
        return lr

    scheduler.get_lr = types.MethodType(get_lr, scheduler)
    scheduler.step(0)
