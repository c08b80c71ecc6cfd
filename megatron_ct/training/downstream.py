"""Downstream tasks in the training loop, on the training ranks, without export.

``data.downstream_tasks`` (local tasks: megatron_ct/evaluation/tasks.py) are scored on the
model being trained, at any TP/PP/DP, through the same engine tools/eval_tasks.py uses
(:class:`~megatron_ct.evaluation.lm.CTLM`): at iteration 0 (the base line, with the validation
sets' base-line evaluation), at every stage boundary, every ``data.downstream_interval`` steps
and at the end. Each record goes to ``downstream.jsonl`` in the log directory (rank 0) with its
iteration, stage and trigger, and, once a base line exists, its change from it. A task whose
accuracy falls by more than ``data.max_regression[task]`` (relative to its base value) is
reported, and stops the run with ``data.on_regression=stop``, as validation sets do.

The base values and the iterations already evaluated are saved through the checkpoint manager
(component ``downstream``): a resumed run compares with the same base line and does not score
an iteration again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch.distributed as dist

from megatron_ct.evaluation.downstream import headline, local_records
from megatron_ct.jsonl import JsonlLog

log = logging.getLogger("megatron_ct")


class DownstreamEvaluator:
    """Owns the downstream tasks of a run, their base line and ``downstream.jsonl``."""

    def __init__(
        self,
        tasks: list,
        tokenizer,
        *,
        vocab_size: int,
        max_length: int,
        micro_batch_size: int,
        interval: int | None,
        max_regression: dict[str, float],
        log_dir: str | None = None,
    ) -> None:
        self.tasks, self.tokenizer = tasks, tokenizer
        self.vocab_size, self.max_length, self.mbs = vocab_size, max_length, micro_batch_size
        self.interval = interval
        self.max_regression = {k: v for k, v in max_regression.items() if k in {t.name for t in tasks}}
        self.baseline: dict[str, float] = {}
        self.done: list[int] = []
        self.last: dict[str, float] = {}
        self.is_writer = dist.get_rank() == 0
        self._jsonl = JsonlLog(os.path.join(log_dir, "downstream.jsonl") if self.is_writer and log_dir else None)

    def due(self, iteration: int) -> bool:
        """An interval evaluation after ``iteration`` steps?"""
        return bool(self.tasks and self.interval and iteration % self.interval == 0)

    def evaluate(self, model_chunks, iteration: int, stage: str, trigger: str) -> dict[str, float] | None:
        """Collective. Scores every task at ``iteration`` unless it was scored there already (before a
        restart); returns task -> headline accuracy, None when skipped."""
        from megatron_ct.evaluation.lm import CTLM, TextScorer

        if not self.tasks or iteration in self.done:
            return None
        t0 = time.perf_counter()
        engine = CTLM(model_chunks, self.vocab_size, self.max_length, micro_batch_size=self.mbs)
        try:
            records = local_records(self.tasks, TextScorer(engine, self.tokenizer))
        finally:
            for chunk in model_chunks:
                chunk.train()
        scores = headline(records)
        if trigger == "baseline":
            self.baseline = dict(scores)
        self.done.append(iteration)
        self.last = scores
        for r in records:
            self._jsonl.write(self._with_base({**r, "iteration": iteration, "stage": stage, "trigger": trigger}))
        if self.is_writer:
            parts = [
                f"{task} acc {value:.4f}"
                + (f" ({value - self.baseline[task]:+.4f} vs base)" if task in self.baseline else "")
                for task, value in scores.items()
            ]
            log.info(
                "downstream iter %d (%s, stage %s) | %s | %.1f s",
                iteration,
                trigger,
                stage,
                " | ".join(parts),
                time.perf_counter() - t0,
            )
        return scores

    def _with_base(self, record: dict[str, Any]) -> dict[str, Any]:
        base = self.baseline.get(record["task"])
        is_headline = record["metric"] == "acc" and record.get("template") in ("mean", None)
        if base is None or not is_headline:
            return record
        change = record["value"] - base
        return {**record, "base_value": base, "change": change, "change_rel": change / base if base else None}

    def regressions(self, scores: dict[str, float] | None) -> list[str]:
        """Tasks whose accuracy fell past ``data.max_regression`` (relative to the base value)."""
        out = []
        for task, limit in self.max_regression.items():
            base, now = self.baseline.get(task), (scores or {}).get(task)
            if base and now is not None and (base - now) / base > limit:
                out.append(
                    f"{task} accuracy {now:.4f}, {100 * (base - now) / base:.2f}% under its base value {base:.4f} "
                    f"(data.max_regression.{task}={limit:g})"
                )
        return out

    def summary(self) -> list[str]:
        """Each task's base value -> its latest, for the end-of-run log."""
        if not self.baseline or not self.last:
            return []
        lines = [f"{'task':24} {'base acc':>9} {'now':>8} {'change':>8}"]
        for task, now in self.last.items():
            base = self.baseline.get(task)
            if base is not None:
                lines.append(f"{task:24} {base:>9.4f} {now:>8.4f} {now - base:>+8.4f}")
        return lines

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": dict(self.baseline), "done": list(self.done)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline = dict(state.get("baseline") or {})
        self.done = [int(i) for i in state.get("done") or []]

    def close(self) -> None:
        self._jsonl.close()
