"""The training loop: build once, (re)load, then step, log, evaluate, checkpoint.

Reads like megatron-core's ``run_simple_mcore_train_loop.py`` plus what continual
pre-training needs. The flow (see docs/ARCHITECTURE.md):

    config -> start-up checks (schedule, checkpoint record, data) -> build (data source,
    model, freeze plan, DDP, optimizer, LR scheduler) -> load -> loop -> checkpoint

Every stage change goes through one hook, :meth:`Trainer.on_stage_start`: it logs the
stage, switches what trains (the freeze plan), starts the stage's LR (the scheduler), puts the
stage's RoPE into the model when it differs (theta, scaling: a long-context stage) and
evaluates the model as it enters the stage (the end of the stage before). It also runs when
a run starts or resumes inside a stage, minus the evaluation. Each step runs at its stage's
sequence length; evaluations keep ``data.seq_length``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ct.checkpoint.manager import CheckpointManager, ModelState, OptimizerState, RNGState
from megatron_ct.checkpoint.meta import CheckpointMeta
from megatron_ct.checkpoint.preemption import PreemptionFlag
from megatron_ct.config import CTConfig, Layout, config_to_dict
from megatron_ct.config.schedule import Stage, model_rope
from megatron_ct.data.batches import build_data_source
from megatron_ct.families import family_of
from megatron_ct.jsonl import RUN_LOGS, JsonlLog, drop_records_after
from megatron_ct.model.llama import Numerics, build_model
from megatron_ct.parallel.distributed import set_collective_timeout
from megatron_ct.training.downstream import DownstreamEvaluator
from megatron_ct.training.evaluate import Evaluator
from megatron_ct.training.flops import peak_tflops_for
from megatron_ct.training.freeze import FreezePlan, optimizer_settings
from megatron_ct.training.metrics import LogInterval, MetricsWriter, Throughput, format_line, memory_gib
from megatron_ct.training.optimizer import build_optimizer, hook_model_config, wrap_ddp
from megatron_ct.training.router_health import RouterHealth
from megatron_ct.training.scheduler import CTScheduler
from megatron_ct.training.stages import StageTracker
from megatron_ct.training.startup import Startup
from megatron_ct.training.step import NonFiniteError, StepResult, train_step
from megatron_ct.training.stragglers import StepTimer
from megatron_ct.training.watchdog import Watchdog

log = logging.getLogger("megatron_ct")


@dataclass
class TrainOutcome:
    """How a run ended (returned to the entry point and to tests)."""

    iteration: int
    reason: str  # 'finished', 'preempted', 'exit_interval', 'regression' (data.on_regression=stop)
    last_loss: float | None


class Trainer:
    def __init__(self, cfg: CTConfig, layout: Layout, startup: Startup) -> None:
        from megatron.core import parallel_state as ps

        self.cfg, self.layout = cfg, layout
        self.schedule = startup.schedule
        self.provenance = startup.provenance
        t, ck = cfg.train, cfg.checkpoint
        dp_rank = ps.get_data_parallel_rank()
        log_dir = cfg.logging.log_dir or ck.save
        self.data = build_data_source(cfg, layout, self.schedule, dp_rank, startup.cache, log_dir)
        self.evaluator = Evaluator(
            cfg.data,
            layout,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            dp_rank=dp_rank,
            cache=startup.cache,
            tokenizer=startup.tokenizer,
            log_dir=log_dir,
            tensorboard_dir=cfg.logging.tensorboard_dir,
        )
        numerics = Numerics(t.precision, t.recompute_granularity, cfg.data.uses_document_attention_mask, ddp=True)
        chunks, self.model_info = build_model(cfg.model, layout, numerics)
        self.rope = model_rope(cfg.model)  # what the model's rotary embedding computes now
        self.stages = StageTracker(self.schedule)
        self.plan = FreezePlan(chunks, self.schedule, cfg.model.num_layers, self.provenance, self.stages)
        self.model = wrap_ddp(chunks, layout)
        self.optimizer = build_optimizer(
            cfg.optim, layout, self.model, self.plan, precision=t.precision, clip_grad=t.clip_grad
        )
        self.scheduler = CTScheduler(self.optimizer, cfg.optim, t.train_iters, self.plan.policies, self.stages)
        hook_model_config(self.model, self.optimizer)
        self.timer = self._step_timer()
        self.router_health = self._router_health()
        self.interval = LogInterval(layout.device)
        # What a checkpoint holds: one registration per component.
        self.checkpoints = CheckpointManager()
        self.checkpoints.register("model", ModelState(self.model))
        self.checkpoints.register("optimizer", OptimizerState(self.optimizer, optimizer_settings, config_to_dict(cfg)))
        self.checkpoints.register("rng", RNGState())
        self.checkpoints.register("scheduler", self.scheduler)
        self.checkpoints.register("data", self.data)
        self.checkpoints.register("evaluator", self.evaluator)
        self.checkpoints.register("stage", self.stages)
        self.checkpoints.register("log_interval", self.interval)  # the next record's loss sums
        if self.router_health is not None:  # the open log interval and the dead-expert count
            self.checkpoints.register("router_health", self.router_health)
        self.downstream = None
        if startup.downstream_tasks:
            self.downstream = DownstreamEvaluator(
                startup.downstream_tasks,
                startup.tokenizer,
                vocab_size=cfg.model.vocab_size,
                max_length=cfg.data.seq_length,
                micro_batch_size=t.micro_batch_size,
                interval=cfg.data.downstream_interval,
                max_regression=cfg.data.max_regression,
                log_dir=log_dir,
            )
            self.checkpoints.register("downstream", self.downstream)
        self.baseline = cfg.data.eval_baseline
        if self.baseline is None:  # on by default when the run starts from a base model
            self.baseline = bool(ck.load and ck.load_weights_only)
        self.iteration = 0
        self._last_saved: int | None = None
        if startup.load_dir:
            self.checkpoints.load(startup.load_dir, startup.meta, weights_only=ck.load_weights_only, verify=ck.verify)
            if not ck.load_weights_only:
                self.iteration = self._last_saved = startup.meta.iteration
                log.info("resumed from %s at iteration %d (%s)", startup.load_dir, self.iteration, self.data.progress())
                if dist.get_rank() == 0 and log_dir:
                    for name in RUN_LOGS:  # what the interrupted job logged past the checkpoint
                        dropped = drop_records_after(os.path.join(log_dir, name), self.iteration)
                        if dropped:
                            log.info("%s: dropped %d records past iteration %d", name, dropped, self.iteration)
        self.is_writer = dist.get_rank() == 0
        self.metrics = MetricsWriter(self.is_writer, log_dir, cfg.logging.tensorboard_dir)
        self._ranks_log = JsonlLog(os.path.join(log_dir, "ranks.jsonl") if self.is_writer and log_dir else None)
        # Hang dumps beside the checkpoints, where the sbatch script looks for them.
        self.watchdog = None
        if t.hang_detection:
            sections = {"evaluation": t.eval_hang_timeout_s, "save": t.save_hang_timeout_s}
            self.watchdog = Watchdog(dist.get_rank(), ck.save or log_dir, t.hang_timeout_s, sections)
        self._throughput: Throughput | None = None
        self._first_loss: float | None = None
        self._log_startup()

    def _log_startup(self) -> None:
        info, lay = self.model_info, self.layout
        total = torch.tensor([info.num_parameters], dtype=torch.float64, device=lay.device)
        dist.all_reduce(total)
        log.info(
            "model: %s, %.2fM parameters | transformer_impl=%s | norm=%s | vocab %d (padded %d) | "
            "layout %s | %d micro-batches/step | device=%s | precision=%s",
            self.cfg.model.family,
            total.item() / (lay.dims.dp * lay.dims.cp) / 1e6,  # replicas: every DP x CP rank
            info.transformer_impl,
            info.norm_impl,
            info.true_vocab_size,
            info.padded_vocab_size,
            lay.dims.describe(),
            lay.num_microbatches,
            lay.device,
            self.cfg.train.precision,
        )

    def _step_timer(self) -> StepTimer:
        """Per-rank compute and data-wait times (megatron_ct/training/stragglers.py): the step's
        compute ends where megatron-core's schedule finalises the gradients."""
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_model_config

        timer = StepTimer(
            self.layout.device, ps.get_pipeline_model_parallel_rank(), self.cfg.logging.straggler_threshold
        )
        config = get_model_config(self.model[0])
        finalize = config.finalize_model_grads_func

        def finalize_timed(*args, **kwargs):
            timer.compute_done()
            return finalize(*args, **kwargs)

        config.finalize_model_grads_func = finalize_timed
        return timer

    def _router_health(self) -> RouterHealth | None:
        """Mixtures of experts: expert load and the routers' losses on log steps
        (megatron_ct/training/router_health.py)."""
        m, dims = self.cfg.model, self.layout.dims
        if not m.num_experts:
            return None
        return RouterHealth(
            self.model,
            num_layers=m.num_layers,
            num_experts=m.num_experts,
            topk=m.moe_router_topk,
            aux_loss=m.moe_aux_loss_coeff > 0,
            z_loss=m.moe_z_loss_coeff > 0,
            token_copies=1 if dims.sequence_parallel else dims.tp,
            tp_cp=dims.tp * dims.cp,
            dead_expert_intervals=self.cfg.logging.moe_dead_expert_intervals,
            device=self.layout.device,
            is_writer=dist.get_rank() == 0,
        )

    # --- checkpoint -----------------------------------------------------------------------
    def checkpoint_meta(self) -> CheckpointMeta:
        config = config_to_dict(self.cfg)
        if self.rope != model_rope(self.cfg.model):
            # The record's model section is the model as trained up to this iteration (a stage's
            # RoPE): what evaluation, merges and the HF export (config.json) build.
            m = config["model"]
            m["rotary_base"], m["rope_scaling"], m["max_position_embeddings"] = self.rope
        return CheckpointMeta(
            config=config,
            true_vocab_size=self.model_info.true_vocab_size,
            padded_vocab_size=self.model_info.padded_vocab_size,
            layout={"tp": self.layout.dims.tp, "pp": self.layout.dims.pp},
            iteration=self.iteration,
            **self.provenance,
        )

    def save(self) -> None:
        ck = self.cfg.checkpoint
        t0 = time.perf_counter()
        path = self.checkpoints.save(ck.save, self.checkpoint_meta(), keep_last=ck.keep_last, verify=ck.verify)
        self._last_saved = self.iteration
        log.info("saved checkpoint %s in %.1fs", path, time.perf_counter() - t0)

    # --- the stage-start hook -------------------------------------------------------------
    def on_stage_start(self, stage: Stage) -> None:
        """Log the stage, switch what trains, the LR and the RoPE, and evaluate at a stage boundary."""
        first = self.stages.current is None
        self.stages.enter(stage)
        if self.is_writer:
            resumed = f" (resuming at iteration {self.iteration + 1})" if self.iteration > stage.start_iter else ""
            log.info("%s%s", self.schedule.describe(stage, self.cfg.train.train_iters), resumed)
            note = self.stages.resume_note(self.iteration) if first else None
            if note:
                log.warning("stage: %s", note)
        self.scheduler.refresh()  # the new stage's multipliers and re-warm
        if self.cfg.train.trainable_params or stage.trainable_params:
            log.info(
                "training %d of %d parameter elements on rank 0 in stage %r",
                self.plan.trainable_elements(),
                self.plan.total,
                stage.name,
            )
        if self.iteration == 0 and self.baseline:
            self._evaluate("baseline", stage.name)  # every set's and task's base value, before any update
        self._use_rope(stage)  # after the base line: that is the base model's, as loaded

    def _use_rope(self, stage: Stage) -> None:
        """Put ``stage``'s RoPE into the model if it runs with another (a long-context stage)."""
        if stage.rope != self.rope:
            from megatron_ct.model.rope import switch_rope

            switch_rope(self.model, self.cfg.model.head_dim, *stage.rope)
            self.rope = stage.rope

    def _evaluate(self, trigger: str, stage_name: str, sets: bool = True, tasks: bool = True) -> None:
        """Validation sets and downstream tasks at this iteration (each skips an iteration it
        evaluated before a restart); a regression past data.max_regression warns or stops."""
        t0 = time.perf_counter()
        with self._watched("evaluation"):
            results = self.evaluator.evaluate(self.model, self.iteration, stage_name, trigger) if sets else None
            scores = None
            if tasks and self.downstream is not None:
                scores = self.downstream.evaluate(self.model, self.iteration, stage_name, trigger)
        if self._throughput is not None:
            self._throughput.exclude(time.perf_counter() - t0)
        regressed = self.evaluator.regressions(results)
        regressed += self.downstream.regressions(scores) if self.downstream is not None else []
        if regressed:
            stop = self.cfg.data.on_regression == "stop"
            log.warning(
                "iteration %d: %s%s", self.iteration, "; ".join(regressed), " -> saving and stopping" if stop else ""
            )
            if stop:
                self._reason = "regression"

    # --- the loop ---------------------------------------------------------------------------
    def train(self) -> TrainOutcome:
        cfg, t = self.cfg, self.cfg.train
        self._throughput = Throughput(self.layout.dims.world_size, self._peak_tflops())
        preempt = PreemptionFlag(cfg.checkpoint.save_on_sigterm and cfg.checkpoint.save is not None, self.layout.on_gpu)
        self._reason, self._last = "finished", None
        self._skipped_in_a_row = self._since_log = 0
        if self.layout.on_gpu:
            torch.cuda.reset_peak_memory_stats()
        # Start-up is over (rendezvous, data indices, checkpoint load): collectives now wait at
        # most the training timeout (parallel.distributed_timeout_minutes).
        set_collective_timeout(cfg.parallel.distributed_timeout_minutes)
        try:
            if t.train_iters == 0 and self.iteration == 0:
                self.on_stage_start(self.schedule.stage_at(0))  # the base-line evaluation alone
            if self.iteration > 0:  # a boundary a checkpoint (of an older run) was saved at before its evaluation
                self._use_rope(self.schedule.stage_at(self.iteration - 1))  # the model that stage trained
                self._evaluate_step_end(boundaries_only=True)
            while self.iteration < t.train_iters:
                stage = self.schedule.stage_at(self.iteration)
                if stage is not self.stages.current:
                    self.on_stage_start(stage)
                if self._reason == "regression" or self._iteration(preempt):
                    break
            if cfg.checkpoint.save and self._last_saved != self.iteration:
                self._timed_save()
        finally:
            preempt.restore()
            self.metrics.close()
            self._ranks_log.close()
            if self.watchdog is not None:
                self.watchdog.close()
            self.evaluator.close()
            if self.downstream is not None:
                self.downstream.close()
            self.data.close()
        if self._reason == "preempted":
            log.warning("SIGTERM received: saved iteration %d and stopping", self.iteration)
        for line in self.evaluator.summary() if self.is_writer else []:
            log.info("base -> now | %s", line)
        for line in self.downstream.summary() if self.is_writer and self.downstream is not None else []:
            log.info("base -> now | %s", line)
        if self._first_loss is not None and self._last is not None:
            log.info(
                "done (%s) at iteration %d: loss %.4f -> %.4f",
                self._reason,
                self.iteration,
                self._first_loss,
                self._last,
            )
        return TrainOutcome(self.iteration, self._reason, self._last)

    def _iteration(self, preempt: PreemptionFlag) -> bool:
        """One step and its bookkeeping; True when the run must stop here."""
        cfg, t = self.cfg, self.cfg.train
        seq = self.stages.current.seq_length  # the stage's: a long-context stage runs longer sequences
        self.timer.step_start()
        if self.watchdog is not None:
            self.watchdog.arm(self.iteration + 1)
        result = train_step(
            self.iteration,
            self.timer.timed(self.data.next_batch()),
            self.model,
            self.optimizer,
            self.scheduler,
            device=self.layout.device,
            num_microbatches=self.layout.num_microbatches,
            seq_length=seq,
            micro_batch_size=t.micro_batch_size,
            nan_policy=t.nan_policy,
        )
        tokens = t.global_batch_size * seq
        flops = tokens * family_of(cfg.model).flops_per_token(cfg.model, seq, self.model_info.padded_vocab_size)
        self._throughput.step(tokens, flops)
        self.iteration += 1
        self._since_log += 1
        self.interval.add(result.loss_sums)
        if result.applied:
            self._skipped_in_a_row = 0
        else:
            self._skipped_in_a_row += 1
            self.interval.skipped_steps += 1
            log.warning("iteration %d: %s", self.iteration, result.reason)
            if self._skipped_in_a_row > t.max_skipped_steps:
                raise NonFiniteError(
                    f"{self._skipped_in_a_row} consecutive steps skipped (train.max_skipped_steps="
                    f"{t.max_skipped_steps}); stopping"
                )
        if self.iteration % cfg.logging.log_interval == 0 or self.iteration == t.train_iters:
            self._log(result)
        self._evaluate_step_end()  # before the save, so the checkpoint records what was evaluated
        ck = cfg.checkpoint
        if ck.save and ck.save_interval and self.iteration % ck.save_interval == 0:
            self._timed_save()
        stop = self._stop_reason(preempt)  # collective (every rank agrees on a preemption)
        if self.watchdog is not None:
            self.watchdog.disarm()
        return stop

    def _watched(self, section: str):
        """An evaluation or a save: the hang watchdog's step clock stops, the section's runs."""
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.section(section, self.iteration)

    def _stop_reason(self, preempt: PreemptionFlag) -> bool:
        t = self.cfg.train
        if self._reason == "regression":
            return True
        if preempt.poll():
            self._reason = "preempted"
            return True
        if t.exit_interval and self.iteration % t.exit_interval == 0 and self.iteration < t.train_iters:
            self._reason = "exit_interval"
            return True
        return False

    def _evaluate_step_end(self, boundaries_only: bool = False) -> None:
        """After step ``iteration``: everything at a stage end or the last step, else what is due."""
        it, stage = self.iteration, self.schedule.stage_at(self.iteration - 1).name
        if self.schedule.is_stage_end(it) or it == self.cfg.train.train_iters:
            self._evaluate("stage_end" if self.schedule.is_stage_end(it) else "end", stage)
        elif not boundaries_only:
            downstream_due = self.downstream is not None and self.downstream.due(it)
            if self.evaluator.due(it) or downstream_due:
                self._evaluate("interval", stage, sets=self.evaluator.due(it), tasks=downstream_due)

    def _timed_save(self) -> None:
        t0 = time.perf_counter()
        with self._watched("save"):
            self.save()
        self._throughput.exclude(time.perf_counter() - t0)

    def _peak_tflops(self) -> float | None:
        if self.cfg.logging.peak_tflops is not None:
            return self.cfg.logging.peak_tflops
        if self.layout.on_gpu:
            return peak_tflops_for(torch.cuda.get_device_name())
        return None

    def _log(self, result: StepResult) -> None:
        """The log-step record: the loss is the mean over the steps since the last record."""
        loss_sum, tokens = self.interval.take()
        loss = loss_sum / max(tokens, 1.0)
        perf = self._throughput.measure(self._since_log, self.cfg.train.train_iters - self.iteration)
        self._since_log = 0
        record = {
            "iteration": self.iteration,
            "loss": loss,
            "lr": result.lr,
            **{f"lr_{cls}": result.lr * m for cls, m in self.plan.class_multipliers().items()},
            "grad_norm": result.grad_norm,
            "applied": result.applied,
            "skipped_steps": self.interval.skipped_steps,
            **self.data.progress(),
            "memory_gib": memory_gib(self.layout.device),
            **perf,
        }
        timing = self.timer.report(self.iteration)  # collective; rank 0 gets the per-rank times
        if timing is not None:
            record.update(timing["metrics"])
            self._ranks_log.write(timing["ranks"])
        if self.router_health is not None:
            record.update(self.router_health.report(self.iteration))  # collective
        if self.schedule.curriculum:
            record["stage"] = self.stages.current.name
        if self._first_loss is None:
            self._first_loss = loss
        self._last = loss
        if self.is_writer:
            log.info(format_line(record, self.cfg.train.train_iters))
        self.metrics.write(record)


def run_training(cfg: CTConfig) -> TrainOutcome:
    """Check the world, set up the process group, check files, build, train, tear down."""
    from megatron_ct.parallel.device import keep_freed_host_memory
    from megatron_ct.parallel.distributed import init_distributed, read_launch_env, teardown_distributed
    from megatron_ct.training.startup import check_startup, resolve_layout, startup_preflight

    env = read_launch_env()
    layout = resolve_layout(cfg, env.world_size, env.local_rank)
    logging.basicConfig(
        level=logging.INFO if env.rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{env.rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # megatron-core logs every parameter name and its full optimizer config at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    init_distributed(cfg, layout, env)
    try:
        startup = check_startup(cfg, layout)
        if env.rank == 0:
            startup_preflight(cfg)
        if not layout.on_gpu:  # training only: its micro-batches free and refill the same memory
            log.info("host memory: %s", keep_freed_host_memory())
        return Trainer(cfg, layout, startup).train()
    finally:
        teardown_distributed()
