"""The training loop: build, (re)load, step, log, checkpoint.

Reads like megatron-core's ``run_simple_mcore_train_loop.py`` plus what continual
pre-training needs: weights-only starts from a base model, preemption-safe saves,
per-step NaN policy and throughput/MFU reporting, and curricula over indexed datasets
(data state in checkpoints, LR re-warm at stage starts, named validation sets evaluated
every ``data.eval_interval`` steps and at stage ends).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ct.checkpoint.dist_ckpt import (
    PROVENANCE_KEYS,
    load_checkpoint,
    read_common,
    resolve_load_dir,
    save_checkpoint,
)
from megatron_ct.checkpoint.preemption import PreemptionFlag
from megatron_ct.config import CTConfig, Layout, config_to_dict
from megatron_ct.data.batches import build_batch_source
from megatron_ct.data.curriculum import check_data_options
from megatron_ct.model.llama import build_model
from megatron_ct.training.evaluate import Evaluator
from megatron_ct.training.flops import flops_per_token, peak_tflops_for
from megatron_ct.training.freeze import StageFreezer, apply_trainable_params, stage_trainable_windows
from megatron_ct.training.metrics import MetricsWriter, Throughput, format_line, memory_gib
from megatron_ct.training.optimizer import build_optimizer, build_scheduler, hook_model_config, wrap_ddp
from megatron_ct.training.stage_lr import install_stage_rewarm, rewarm_windows
from megatron_ct.training.step import train_step

log = logging.getLogger("megatron_ct")


@dataclass
class TrainOutcome:
    """How a run ended (returned to the entry point and to tests)."""

    iteration: int
    reason: str  # 'finished', 'preempted', 'exit_interval'
    last_loss: float | None


class Trainer:
    def __init__(self, cfg: CTConfig, layout: Layout, device: str) -> None:
        from megatron.core import parallel_state as ps

        self.cfg, self.layout, self.device = cfg, layout, device
        # Data first: a missing dataset file or a bad data option is a ConfigError on every
        # rank before any collective.
        check_data_options(cfg, device)
        dp_rank = ps.get_data_parallel_rank()
        log_dir = cfg.logging.log_dir or cfg.checkpoint.save
        self.batches = build_batch_source(cfg, layout, dp_rank, device, log_dir)
        self.evaluator = Evaluator(cfg, layout, dp_rank, device, getattr(self.batches, "cache", None), log_dir)
        chunks, self.model_info = build_model(cfg, layout, device)
        ck = cfg.checkpoint
        loaded_common = read_common(resolve_load_dir(ck.load)[0]) if ck.load else {}
        self._provenance = {k: loaded_common[k] for k in PROVENANCE_KEYS if k in loaded_common}
        windows = stage_trainable_windows(cfg)
        if windows:  # curriculum stages differ in what learns: switch by LR at stage starts
            self.freezer = StageFreezer(chunks, windows, cfg.model.num_layers, self._provenance)
            self.trainable = apply_trainable_params(chunks, None, cfg.model.num_layers)
        else:
            self.freezer = None
            self.trainable = apply_trainable_params(
                chunks, cfg.train.trainable_params, cfg.model.num_layers, self._provenance
            )
        self.model = wrap_ddp(cfg, chunks)
        self.optimizer = build_optimizer(cfg, self.model, self.freezer.overrides() if self.freezer else None)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        install_stage_rewarm(self.scheduler, rewarm_windows(cfg), cfg.optim.lr_warmup_init)
        hook_model_config(self.model, self.optimizer)
        self.iteration = 0
        self._last_saved: int | None = None
        self._first_loss: float | None = None
        self._stage = None  # curriculum stage of the last step (announced when it changes)
        if ck.load:
            state = load_checkpoint(
                ck.load,
                self.model,
                self.optimizer,
                self.scheduler,
                weights_only=ck.load_weights_only,
                expected_vocab_size=cfg.model.vocab_size,
            )
            self.iteration = state.iteration
            data_state = None if ck.load_weights_only else state.common.get("data")
            self.batches.resume(state.iteration, state.consumed_samples, data_state)
            self._last_saved = None if ck.load_weights_only else self.iteration
            log.info(
                "resumed from %s at iteration %d (%d samples consumed)", ck.load, self.iteration, state.consumed_samples
            )
        self.is_writer = dist.get_rank() == 0
        self.metrics = MetricsWriter(self.is_writer, log_dir, cfg.logging.tensorboard_dir)
        self._log_startup()

    def _log_startup(self) -> None:
        info, lay = self.model_info, self.layout
        total = torch.tensor(
            [info.num_parameters], dtype=torch.float64, device="cuda" if self.device == "cuda" else "cpu"
        )
        dist.all_reduce(total)
        if self.cfg.train.trainable_params:
            log.info(
                "training %d of %d parameter elements on rank 0 (train.trainable_params=%s)",
                *self.trainable,
                self.cfg.train.trainable_params,
            )
        log.info(
            "model: %.2fM parameters | transformer_impl=%s | norm=%s | vocab %d (padded %d) | "
            "layout TP%d PP%d%s DP%d | %d micro-batches/step | device=%s | precision=%s",
            total.item() / lay.dp / 1e6,
            info.transformer_impl,
            info.norm_impl,
            info.true_vocab_size,
            info.padded_vocab_size,
            lay.tp,
            lay.pp,
            f" VPP{lay.vpp}" if lay.vpp else "",
            lay.dp,
            lay.num_microbatches,
            self.device,
            self.cfg.train.precision,
        )

    def _common_state(self) -> dict:
        return {
            "consumed_samples": self.batches.consumed_samples(self.iteration),
            # Curriculum data state (per-dataset stream positions, interleave segment); None
            # for the synthetic stream, whose position is consumed_samples alone.
            "data": self.batches.state_dict(),
            "config": config_to_dict(self.cfg),
            "model_info": {
                "true_vocab_size": self.model_info.true_vocab_size,
                "padded_vocab_size": self.model_info.padded_vocab_size,
            },
            **self._provenance,
        }

    def save(self) -> None:
        ck = self.cfg.checkpoint
        t0 = time.perf_counter()
        path = save_checkpoint(
            ck.save,
            self.iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            self._common_state(),
            keep_last=ck.keep_last,
        )
        self._last_saved = self.iteration
        log.info("saved checkpoint %s in %.1fs", path, time.perf_counter() - t0)

    def _peak_tflops(self) -> float | None:
        if self.cfg.logging.peak_tflops is not None:
            return self.cfg.logging.peak_tflops
        if self.device == "cuda":
            return peak_tflops_for(torch.cuda.get_device_name())
        return None

    def train(self) -> TrainOutcome:
        cfg, t = self.cfg, self.cfg.train
        seq = cfg.data.seq_length
        tokens_per_step = t.global_batch_size * seq
        throughput = Throughput(
            tokens_per_step,
            tokens_per_step * flops_per_token(cfg.model, seq, self.model_info.padded_vocab_size),
            self.layout.world_size,
            self._peak_tflops(),
        )
        preempt = PreemptionFlag(cfg.checkpoint.save_on_sigterm and cfg.checkpoint.save is not None, self.device)
        reason, result, skipped_in_a_row, skipped_total, since_log = "finished", None, 0, 0, 0
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            while self.iteration < t.train_iters:
                self._announce_stage()
                if self.freezer is not None and self.freezer.apply(self.optimizer, self.scheduler, self.iteration):
                    _, _, patterns = self.freezer.windows[self.freezer.current]
                    log.info("iteration %d on: training %s", self.iteration + 1, patterns or "all parameters")
                result = train_step(
                    self.iteration,
                    self.batches.microbatches(self.iteration),
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    num_microbatches=self.layout.num_microbatches,
                    seq_length=seq,
                    micro_batch_size=t.micro_batch_size,
                    nan_policy=t.nan_policy,
                    device=self.device,
                )
                self.iteration += 1
                since_log += 1
                if result.applied:
                    skipped_in_a_row = 0
                else:
                    skipped_in_a_row += 1
                    skipped_total += 1
                    log.warning("iteration %d: %s", self.iteration, result.reason)
                    if skipped_in_a_row > t.max_skipped_steps:
                        raise RuntimeError(
                            f"{skipped_in_a_row} consecutive steps skipped (train.max_skipped_steps="
                            f"{t.max_skipped_steps}); stopping"
                        )
                if self.iteration % cfg.logging.log_interval == 0 or self.iteration == t.train_iters:
                    self._log(result, throughput.measure(since_log, t.train_iters - self.iteration), skipped_total)
                    since_log = 0
                self._maybe_evaluate()
                ck = cfg.checkpoint
                if ck.save and ck.save_interval and self.iteration % ck.save_interval == 0:
                    self.save()
                if preempt.any_rank_received():
                    reason = "preempted"
                    break
                if t.exit_interval and self.iteration % t.exit_interval == 0 and self.iteration < t.train_iters:
                    reason = "exit_interval"
                    break
            if cfg.checkpoint.save and self._last_saved != self.iteration:
                self.save()
        finally:
            preempt.restore()
            self.metrics.close()
            self.evaluator.close()
            self.batches.close()
        if reason == "preempted":
            log.warning("SIGTERM received: saved iteration %d and stopping", self.iteration)
        if self._first_loss is not None and result is not None:
            log.info(
                "done (%s) at iteration %d: loss %.4f -> %.4f", reason, self.iteration, self._first_loss, result.loss
            )
        return TrainOutcome(self.iteration, reason, result.loss if result else None)

    def _announce_stage(self) -> None:
        """Log the curriculum stage when the next step starts one (or the run resumes in one)."""
        schedule = self.batches.schedule
        if schedule is None:
            return
        stage = schedule.stage_at(self.iteration)
        if self._stage is stage:
            return
        self._stage = stage
        blend = ", ".join(
            f"{n} {a:.3f}" + (f"->{b:.3f}" if stage.ramped else "")
            for n, a, b in zip(schedule.names, stage.start_weights, stage.end_weights, strict=True)
            if a > 0 or b > 0
        )
        end = stage.end_iter if stage.end_iter is not None else self.cfg.train.train_iters
        log.info(
            "stage %d/%d %r: iterations %d-%d from %d | packing %s | blend %s%s",
            stage.index + 1,
            len(schedule.stages),
            stage.name,
            stage.start_iter + 1,
            end,
            self.iteration + 1,
            stage.packing,
            blend,
            f" | LR re-warm over {stage.lr_rewarm_iters} steps" if stage.lr_rewarm_iters else "",
        )

    def _maybe_evaluate(self) -> None:
        """Validation sets every data.eval_interval steps, at stage ends and at the end of training."""
        schedule = self.batches.schedule
        stage_end = self.iteration == self.cfg.train.train_iters or (
            schedule is not None and schedule.is_stage_end(self.iteration)
        )
        if not self.evaluator.due(self.iteration, stage_end):
            return
        stage = schedule.stage_at(self.iteration - 1).name if schedule is not None else ""
        trigger = "interval"
        if schedule is not None and schedule.is_stage_end(self.iteration):
            trigger = "stage_end"
        elif self.iteration == self.cfg.train.train_iters:
            trigger = "end"
        self.evaluator.evaluate(self.model, self.iteration, stage, trigger)

    def _log(self, result, perf: dict, skipped_total: int) -> None:
        record = {
            "iteration": self.iteration,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "applied": result.applied,
            "skipped_steps": skipped_total,
            "consumed_samples": self.batches.consumed_samples(self.iteration),
            "memory_gib": memory_gib(self.device),
            **perf,
        }
        if self.batches.schedule is not None:
            record["stage"] = self.batches.schedule.stage_at(self.iteration - 1).name
        if self._first_loss is None:
            self._first_loss = result.loss
        if self.is_writer:
            log.info(format_line(record, self.cfg.train.train_iters))
        self.metrics.write(record)


def run_training(cfg: CTConfig) -> TrainOutcome:
    """Validate against the world size (every rank, before any collective), set up the
    process group, train, tear down."""
    from megatron_ct.config import validate_for_world
    from megatron_ct.parallel.distributed import init_distributed, read_launch_env, teardown_distributed

    env = read_launch_env()
    layout = validate_for_world(cfg, env.world_size)
    logging.basicConfig(
        level=logging.INFO if env.rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{env.rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # megatron-core logs every parameter name and its full optimizer config at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    device = init_distributed(cfg, layout, env)
    try:
        return Trainer(cfg, layout, device).train()
    finally:
        teardown_distributed()
