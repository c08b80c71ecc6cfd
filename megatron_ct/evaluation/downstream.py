"""Downstream scores of one model as flat records: local tasks (megatron_ct/evaluation/tasks.py);
lm-evaluation-harness tasks give the same records (megatron_ct/evaluation/lm_eval_model.py).

A record is one number: ``{"task", "metric", "value", "stderr", "template", "n", "suite"}``
(``template``: a local task's template name, ``"mean"`` / ``"spread"`` across its templates, or
None for an lm-eval task; ``suite``: ``local`` or ``lm_eval``). Callers add where it came from
(``iteration``, ``stage``, ``checkpoint``). The same function serves tools/eval_tasks.py and
the trainer's in-loop evaluation, on any engine of :mod:`megatron_ct.evaluation.lm`.
"""

from __future__ import annotations

from typing import Any

# The number a task is judged by (its deltas and the regression guard): the mean over its
# templates of this metric.
HEADLINE_METRIC = "acc"


def local_records(tasks: list, scorer) -> list[dict[str, Any]]:
    """Every local task on ``scorer`` (a :class:`~megatron_ct.evaluation.lm.TextScorer`)."""
    from megatron_ct.evaluation.tasks import evaluate_task

    out = []
    for task in tasks:
        for record in evaluate_task(task, scorer).to_records():
            out.append({**record, "suite": "local"})
    return out


def headline(records: list[dict[str, Any]]) -> dict[str, float]:
    """task -> the number it is judged by: the mean over templates of ``acc`` (local tasks), else
    lm-eval's ``acc`` (or the task's first metric)."""
    out: dict[str, float] = {}
    for r in records:
        task = r["task"]
        if r["suite"] == "local" and r["metric"] == HEADLINE_METRIC and r["template"] == "mean":
            out[task] = r["value"]
        elif r["suite"] == "lm_eval" and (r["metric"] == HEADLINE_METRIC or task not in out):
            out[task] = r["value"]
    return out
