"""Downstream scores across a run, one panel per task: what CT gained and what it cost, per stage.

Reads downstream records (the trainer's ``downstream.jsonl``, tools/eval_tasks.py's output):
each task's headline metric (``acc``; the mean over a local task's templates, with the min-max
of its templates as a band) over iterations, its value before CT as a dotted line (records
labelled ``base``: the original base model, e.g. before a vocabulary expansion, and the run's
iteration-0 evaluation), and the curriculum stage boundaries as dashed vertical lines.
"""

from __future__ import annotations

from collections import defaultdict

from megatron_ct.errors import DataError

METRIC = "acc"


def _headline_rows(records: list[dict]) -> dict[str, list[dict]]:
    """task -> its headline records (mean over templates for local tasks), any label."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("metric") != METRIC:
            continue
        if r.get("suite", "local") == "local" and r.get("template") != "mean":
            continue
        by_task[r["task"]].append(r)
    return by_task


def _spread(records: list[dict], task: str, key) -> tuple[float, float] | None:
    values = [
        r["value"]
        for r in records
        if r.get("task") == task and r.get("metric") == METRIC and r.get("template") not in (None, "mean", "spread")
        and key(r)
    ]  # fmt: skip
    return (min(values), max(values)) if values else None


def stage_starts(records: list[dict]) -> list[tuple[int, str]]:
    """(first iteration, stage) of each stage the records were taken in, in order."""
    seen: dict[str, int] = {}
    for r in sorted((r for r in records if isinstance(r.get("iteration"), int)), key=lambda r: r["iteration"]):
        stage = r.get("stage")
        if stage and stage not in seen:
            seen[stage] = r.get("stage_start", r["iteration"])
    return sorted((it, name) for name, it in seen.items())


def plot_downstream(records: list[dict], output: str, title: str | None = None) -> str:
    """Write the PNG (atomically) and return its path."""
    from megatron_ct.plotting import pyplot, save_png

    plt = pyplot()

    by_task = _headline_rows(records)
    if not by_task:
        raise DataError(f"{output}: no '{METRIC}' records to plot; expected downstream evaluation records")
    tasks = sorted(by_task)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 2.8 * len(tasks)), sharex=True, squeeze=False)
    starts = stage_starts(records)
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        rows = by_task[task]
        bases = [r for r in rows if r.get("label") == "base"]
        run = sorted((r for r in rows if r.get("label") != "base" and isinstance(r.get("iteration"), int)),
                     key=lambda r: r["iteration"])  # fmt: skip
        color = None
        if run:
            xs, ys = [r["iteration"] for r in run], [r["value"] for r in run]
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=f"{task} ({METRIC})")
            color = line.get_color()
            bands = [_spread(records, task, lambda q, it=r["iteration"]: q.get("iteration") == it) for r in run]
            if all(bands):
                ax.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands], color=color, alpha=0.15,
                                label="templates (min-max)")  # fmt: skip
            first = run[0]
            if first["iteration"] == 0:
                ax.axhline(first["value"], color=color, ls=":", lw=1.0, label="iteration 0")
        for b in bases:
            ax.axhline(b["value"], color="black", ls=":", lw=1.0, label=f"base ({b.get('checkpoint') or 'base'})"[:60])
        for i, (it, name) in enumerate(starts):
            if i > 0:
                ax.axvline(it - 0.5, color="gray", ls="--", lw=0.8)
            ax.annotate(name, (it, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8, color="gray")
        ax.set_ylabel(METRIC)
        ax.legend(loc="lower right", fontsize=7)
        ax.set_title(task, fontsize=9)
    axes[-1, 0].set_xlabel("iteration")
    fig.suptitle(title or "downstream tasks")
    fig.tight_layout()
    return save_png(fig, output, dpi=120)
