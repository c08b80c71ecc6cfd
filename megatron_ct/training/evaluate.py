"""Evaluate every named validation set, separately: loss per token and bits per byte.

The trainer asks for it before the first update (the base-line evaluation, ``data.
eval_baseline``), every ``data.eval_interval`` steps, at every stage start (the end of the
stage before) and at the end of training. Once a base line exists every record also says
how far each set moved from it (absolute and relative, loss and bits per byte); the base
values are saved in checkpoints, so a resumed run compares with the same base. It runs megatron-core's pipeline schedule
forward-only with the training ``forward_step`` (same per-token loss sums), so any TP/PP/DP
layout evaluates. Results go to the log, to ``eval.jsonl`` (rank 0, in the metrics directory)
and to TensorBoard as ``eval/<set>/loss`` and ``eval/<set>/bits_per_byte``.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.distributed as dist

from megatron_ct.config import DataConfig, Layout
from megatron_ct.data.index_cache import IndexCache
from megatron_ct.data.valid import ValidationSet, build_validation_sets
from megatron_ct.jsonl import JsonlLog
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
        self.max_regression, self.on_regression = data.max_regression, data.on_regression
        self.baseline: dict[str, dict] = {}  # set -> {"loss", "bits_per_byte", "iteration"}
        self.done: list[int] = []  # iterations evaluated (saved: a resumed run does not repeat them)
        self.last: dict[str, dict] = {}  # set -> the latest record
        self.is_writer = dist.get_rank() == 0
        self._jsonl = JsonlLog(os.path.join(log_dir, "eval.jsonl") if self.is_writer and log_dir else None)
        self._tb = None
        if self.is_writer and self.sets:
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

    def evaluate(self, model_chunks, iteration: int, stage: str, trigger: str) -> dict[str, dict] | None:
        """Collective: every rank calls it. Returns {set: record}; None when there is nothing to
        evaluate or ``iteration`` was evaluated already (before a restart)."""
        if not self.sets or iteration in self.done:
            return None
        self.done.append(iteration)
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
                f"{name} loss {r['loss']:.4f}"
                + (f" bpb {r['bits_per_byte']:.4f}" if r["bits_per_byte"] else "")
                + (f" ({100 * r['change_rel']:+.2f}% vs base)" if r.get("change_rel") is not None else "")
                for name, r in results.items()
            ]
            log.info("eval iter %d (%s, stage %s) | %s", iteration, trigger, stage, " | ".join(parts))
        self.last.update(results)
        return results

    # --- base line and regression guard -----------------------------------------------------
    def _with_base(self, record: dict) -> dict:
        """The record plus its change against the set's base value (when there is one)."""
        if record["trigger"] == "baseline":
            self.baseline[record["set"]] = {k: record[k] for k in ("loss", "bits_per_byte", "iteration")}
        base = self.baseline.get(record["set"])
        if base is None:
            return record
        out = dict(record, base_loss=base["loss"], loss_change=record["loss"] - base["loss"])
        out["loss_change_rel"] = out["loss_change"] / base["loss"] if base["loss"] else None
        if record["bits_per_byte"] is not None and base["bits_per_byte"]:
            out["base_bits_per_byte"] = base["bits_per_byte"]
            out["bpb_change"] = record["bits_per_byte"] - base["bits_per_byte"]
            out["bpb_change_rel"] = out["bpb_change"] / base["bits_per_byte"]
        # The guard's measure: bits per byte where known (comparable across tokenizers), else loss.
        out["change_rel"] = out.get("bpb_change_rel", out["loss_change_rel"])
        return out

    def regressions(self, results: dict[str, dict] | None) -> list[str]:
        """Sets past their ``data.max_regression`` in ``results``, described for the log."""
        out = []
        for name, limit in self.max_regression.items():
            rel = (results or {}).get(name, {}).get("change_rel")
            if rel is not None and rel > limit:
                out.append(f"{name} +{100 * rel:.2f}% over its base value (data.max_regression.{name}={limit:g})")
        return out

    def summary(self) -> list[str]:
        """A table: each set's base value -> its latest (rank 0 logs it at the end of a run)."""
        if not self.baseline or not self.last:
            return []
        lines = [f"{'set':12} {'base loss':>10} {'now':>8} {'change':>8}   {'base bpb':>9} {'now':>8} {'change':>8}"]
        for name, r in self.last.items():
            b = self.baseline.get(name)
            if b is None:
                continue
            bpb = (
                f"{b['bits_per_byte']:>9.4f} {r['bits_per_byte']:>8.4f} {100 * r['bpb_change_rel']:>+7.2f}%"
                if r.get("bpb_change_rel") is not None
                else f"{'-':>9} {'-':>8} {'-':>8}"
            )
            lines.append(f"{name:12} {b['loss']:>10.4f} {r['loss']:>8.4f} {100 * r['loss_change_rel']:>+7.2f}%   {bpb}")
        return lines

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "done": list(self.done)}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = dict(state.get("baseline") or {})
        self.done = [int(i) for i in state.get("done") or []]

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
        record = self._with_base(record)
        self._jsonl.write(record)
        if self._tb is not None:
            self._tb.add_scalar(f"eval/{vs.name}/loss", record["loss"], iteration)
            if record["bits_per_byte"] is not None:
                self._tb.add_scalar(f"eval/{vs.name}/bits_per_byte", record["bits_per_byte"], iteration)
            if record.get("change_rel") is not None:
                self._tb.add_scalar(f"eval/{vs.name}/change_vs_base", record["change_rel"], iteration)
        return record

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
