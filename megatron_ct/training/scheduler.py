"""The learning-rate scheduler: the one owner of every param group's LR and weight decay.

Per group and step::

    lr = multiplier(group, stage) * rewarm(stage, schedule_lr(step))
    wd = weight_decay * wd_mult(group)        (decoupled: applied as lr * wd, so 0 where lr is 0)

- ``schedule_lr`` is megatron-core's OptimizerParamScheduler: warmup from
  ``optim.lr_warmup_init``, then constant/linear/cosine/WSD decay to ``optim.min_lr``;
- ``rewarm``: a stage with ``lr_rewarm_iters: W`` starting at step ``k0`` turns the schedule's
  own LR into a linear ramp ``init + (lr - init) * (k - k0) / W`` for ``k0 <= k < k0 + W``
  (``init = optim.lr_warmup_init``, the same form as the initial warmup);
- ``multiplier`` comes from the group's :class:`~megatron_ct.training.freeze.GroupPolicy` for
  the current stage: trainable_params (0: frozen, the weights move by exactly 0) times the
  class's ``lr_mult``.

``k`` is ``num_steps`` (applied optimizer steps, restored from the checkpoint) and the stage
is the :class:`~megatron_ct.training.stages.StageTracker`'s, which the trainer's stage-start hook
sets (also on resume) before it calls :meth:`CTScheduler.refresh`,
so the LR of every step is a function of the config and the step: identical after a resume.
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ct.config import OptimConfig
from megatron_ct.config.schedule import Stage
from megatron_ct.training.freeze import GroupPolicy
from megatron_ct.training.stages import StageTracker


class CTScheduler(OptimizerParamScheduler):
    """megatron-core's schedule, times each group's stage multiplier, with stage re-warms."""

    def __init__(
        self,
        optimizer,
        optim: OptimConfig,
        train_iters: int,
        policies: dict[str, GroupPolicy] | None = None,
        stages: StageTracker | None = None,
    ) -> None:
        # Set before megatron-core's constructor, which computes the first LRs through get_lr.
        self.policies = policies or {}
        self.stages = stages
        self.rewarm_init = optim.lr_warmup_init
        decay_iters = max(optim.lr_decay_iters or train_iters, optim.lr_warmup_iters + 1)
        wsd = optim.lr_wsd_decay_iters if optim.lr_wsd_decay_iters is not None else max(1, decay_iters // 10)
        super().__init__(
            optimizer,
            init_lr=optim.lr_warmup_init,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.lr_warmup_iters,
            lr_decay_steps=decay_iters,
            lr_decay_style=optim.lr_decay_style,
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=decay_iters,
            wd_incr_style="constant",
            # The config wins over a checkpoint's stored schedule on resume (only the step count
            # is taken from the checkpoint), so a CT recipe can change its schedule between chunks.
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
            wsd_decay_steps=wsd,
            lr_wsd_decay_style=optim.lr_wsd_decay_style,
        )

    @property
    def stage(self) -> Stage | None:
        """The current stage (the tracker's); None: no multipliers, no re-warm."""
        return self.stages.current if self.stages is not None else None

    def refresh(self) -> None:
        """Recompute every group's LR for the coming step (after the stage changed)."""
        self.step(0)

    def _multiplier(self, group: dict) -> float:
        policy = self.policies.get(group.get("ct_group"))
        if policy is None or self.stage is None:
            return 1.0
        return policy.lr_mult[self.stage.index]

    def scheduled_lr(self, group: dict | None = None) -> float:
        """The LR of a multiplier-1 group now: schedule, then the stage's re-warm."""
        lr = super().get_lr(group if group is not None else {})
        st = self.stage
        if (
            st is not None
            and st.lr_rewarm_iters
            and st.start_iter <= self.num_steps < st.start_iter + st.lr_rewarm_iters
        ):
            return self.rewarm_init + (lr - self.rewarm_init) * (self.num_steps - st.start_iter) / st.lr_rewarm_iters
        return lr

    def get_lr(self, param_group: dict) -> float:
        multiplier = self._multiplier(param_group)
        return 0.0 if multiplier == 0.0 else multiplier * self.scheduled_lr(param_group)
