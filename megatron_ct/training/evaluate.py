"""Evaluate every named validation set, separately: loss per token and bits per byte.

The trainer asks for it every ``data.eval_interval`` steps, at every stage start (the end of
the stage before) and at the end of training. It runs megatron-core's pipeline schedule
forward-only with the training ``forward_step`` (same per-token loss sums), so any TP/PP/DP
layout evaluates. Results go to the log, to ``eval.jsonl`` (rank 0, in the metrics directory)
and to TensorBoard as ``eval/<set>/loss`` and ``eval/<set>/bits_per_byte``.
"""

from __future__ import annotations

import json
import logging
import math
import os

import torch
import torch.distributed as dist

from megatron_ct.config import DataConfig, Layout
from megatron_ct.data.index_cache import IndexCache
from megatron_ct.data.valid import ValidationSet, build_validation_sets
from megatron_ct.training.step import reduce_loss_sums, run_schedule, sum_reports

log = logging.getLogger("megatron_ct")


class Evaluator:
    """Owns the validation sets and their eval.jsonl / TensorBoard output."""

    def __init__(
        self,
        data: DataConfig,
        layout: Layout,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        cache: IndexCache,
        tokenizer=None,
        log_dir: str | None = None,
        tensorboard_dir: str | None = None,
    ) -> None:
        self.layout, self.dp_rank, self.mbs, self.seq_length = layout, dp_rank, micro_batch_size, data.seq_length
        self.sets: list[ValidationSet] = build_validation_sets(data, global_batch_size, cache, tokenizer)
        self.interval = data.eval_interval
        self.is_writer = dist.get_rank() == 0
        self._jsonl = self._tb = None
        if self.is_writer and self.sets:
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                self._jsonl = open(os.path.join(log_dir, "eval.jsonl"), "a", buffering=1)
            if tensorboard_dir:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(tensorboard_dir)
                except ImportError:
                    pass  # MetricsWriter already warned
        for vs in self.sets:
            log.info(
                "valid set %r: %d documents, %s tokens scored%s",
                vs.name,
                vs.num_docs,
                f"{vs.predicted_tokens:,}",
                f", {vs.bytes:,} bytes" if vs.bytes is not None else "",
            )

    def due(self, iteration: int) -> bool:
        """An interval evaluation after ``iteration`` steps?"""
        return bool(self.sets and self.interval and iteration % self.interval == 0)

    def evaluate(self, model_chunks, iteration: int, stage: str, trigger: str) -> dict[str, dict]:
        """Collective: every rank calls it. Returns {set: record}."""
        results = {}
        for chunk in model_chunks:
            chunk.eval()
        try:
            with torch.no_grad():
                for vs in self.sets:
                    results[vs.name] = self._one(model_chunks, vs, iteration, stage, trigger)
        finally:
            for chunk in model_chunks:
                chunk.train()
        if self.is_writer:
            parts = [
                f"{name} loss {r['loss']:.4f}" + (f" bpb {r['bits_per_byte']:.4f}" if r["bits_per_byte"] else "")
                for name, r in results.items()
            ]
            log.info("eval iter %d (%s, stage %s) | %s", iteration, trigger, stage, " | ".join(parts))
        return results

    def _one(self, model_chunks, vs: ValidationSet, iteration: int, stage: str, trigger: str) -> dict:
        local = torch.zeros(2, dtype=torch.float64, device=self.layout.device)
        for it in range(vs.eval_iters):
            reports = run_schedule(
                model_chunks,
                vs.microbatches(it, self.dp_rank, self.mbs, self.layout),
                num_microbatches=self.layout.num_microbatches,
                seq_length=self.seq_length,
                micro_batch_size=self.mbs,
                forward_only=True,
            )
            local += sum_reports(reports, self.layout.device)
        loss_sum, tokens = reduce_loss_sums(local)
        record = {
            "iteration": iteration,
            "stage": stage,
            "trigger": trigger,
            "set": vs.name,
            "loss": loss_sum / max(tokens, 1.0),
            "tokens": int(tokens),
            "bytes": vs.bytes,
            "bits_per_byte": loss_sum / math.log(2) / vs.bytes if vs.bytes else None,
        }
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.add_scalar(f"eval/{vs.name}/loss", record["loss"], iteration)
            if record["bits_per_byte"] is not None:
                self._tb.add_scalar(f"eval/{vs.name}/bits_per_byte", record["bits_per_byte"], iteration)
        return record

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
