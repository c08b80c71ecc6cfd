"""Sweep the interpolation between a base and its CT checkpoint: what each alpha gains and loses.

For every ``alpha`` the merge ``(1 - alpha) * base + alpha * ct`` is written into the work
directory and evaluated on named validation sets; the result is a table, ``sweep.jsonl`` (one
record per alpha) and ``sweep.png``: the gain on the target set (what CT was for) against the
change on the general set (what the base knew), both relative to ``alpha = 0``, each point
labelled by its alpha, so a user picks the trade-off they want.

Evaluation runs the trainer for zero steps (:class:`TrainerEvaluation`): ``pretrain_ct.py
--config RECIPE checkpoint.load=<merged> checkpoint.load_weights_only=true train.train_iters=0
data.eval_baseline=true logging.log_dir=<dir>`` evaluates every ``data.valid`` set of the
recipe before the first update into ``<dir>/eval.jsonl``. Any callable with the same shape
(checkpoint, log directory) -> eval records can stand in for it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ct.checkpoint.merge import merge_checkpoints
from megatron_ct.errors import ConfigError, ConversionError, CTError
from megatron_ct.parallel.launch import child_env, free_port, torchrun_command

log = logging.getLogger(__name__)

# What makes the trainer an evaluator: weights only, no update, every validation set
# evaluated before the first update, nothing saved. Applied after the user's overrides.
EVAL_OVERRIDES = (
    "checkpoint.load_weights_only=true",
    "train.train_iters=0",
    "data.eval_baseline=true",
    "checkpoint.save=null",
    "logging.tensorboard_dir=null",
)

Evaluate = Callable[[str, str], list[dict]]
"""(checkpoint save root, log directory) -> eval records ({"set", "loss", "bits_per_byte", ...})."""


@dataclass
class TrainerEvaluation:
    """Evaluate a checkpoint on the recipe's validation sets with ``pretrain_ct.py``, zero steps."""

    recipe: str
    overrides: list[str] = field(default_factory=list)
    """Extra trainer overrides (layout, batch sizes, ...), before :data:`EVAL_OVERRIDES`."""
    nproc: int = 1
    """Processes (torchrun ``--nproc_per_node``)."""
    script: str = str(Path(__file__).resolve().parents[2] / "pretrain_ct.py")

    def valid_sets(self) -> list[str]:
        """The recipe's validation set names (ConfigError for a bad recipe or override)."""
        from megatron_ct.config import load_config

        cfg = load_config(self.recipe, self.overrides)
        return list(cfg.data.valid)

    def command(self, ckpt: str, log_dir: str) -> list[str]:
        args = [
            "--config",
            self.recipe,
            *self.overrides,
            f"checkpoint.load={ckpt}",
            *EVAL_OVERRIDES,
            f"logging.log_dir={log_dir}",
        ]
        return torchrun_command(self.nproc, self.script, args, master_port=free_port())

    def __call__(self, ckpt: str, log_dir: str) -> list[dict]:
        if not os.path.isfile(self.script):
            raise ConfigError(f"{self.script}: not found (the sweep runs the trainer of a megatron-ct checkout)")
        os.makedirs(log_dir, exist_ok=True)
        out = os.path.join(log_dir, "trainer.log")
        with open(out, "w") as f:
            rc = subprocess.call(self.command(ckpt, log_dir), stdout=f, stderr=subprocess.STDOUT, env=child_env())
        if rc != 0:
            # The trainer's own one-line error if it printed one (torchrun adds its own report).
            lines = [li.strip() for li in Path(out).read_text(errors="replace").splitlines() if li.strip()]
            reason = next((li for li in lines if li.startswith("pretrain_ct.py:")), lines[-1] if lines else "")
            message = f"evaluating {ckpt} with {self.recipe} failed (exit {rc}; log {out}): {reason}"
            raise ConfigError(message) if "config error" in reason else CTError(message)
        return read_baseline(log_dir)


def read_baseline(log_dir: str) -> list[dict]:
    """The records at iteration 0 of ``<log_dir>/eval.jsonl`` (the last one per set)."""
    path = os.path.join(log_dir, "eval.jsonl")
    records: dict[str, dict] = {}
    if os.path.isfile(path):
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("iteration") == 0:
                    records[r["set"]] = r
    if not records:
        raise CTError(
            f"{path}: no evaluation at iteration 0 (expected data.eval_baseline and data.valid sets in the recipe)"
        )
    return list(records.values())


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """Sorted, distinct, finite; alpha 0 (the reference of every gain) is added if missing."""
    if not alphas:
        raise ConversionError("--sweep-alphas: expected at least one alpha")
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise ConversionError(f"--sweep-alphas: expected finite numbers, got {bad[0]}")
    return sorted(set(alphas) | {0.0})


def summarize(alpha: float, records: list[dict], reference: dict[str, dict] | None, target: str, general: str) -> dict:
    """One JSONL record: per-set values plus the target gain and general change against alpha 0.

    The metric is bits per byte when both sets have it (tokenizer-independent), else loss per
    token. ``target_gain = metric_0 - metric`` (positive: better on the target set);
    ``general_change = metric - metric_0`` (positive: forgetting); ``*_rel`` divide by metric_0.
    """
    sets = {r["set"]: {k: r.get(k) for k in ("loss", "bits_per_byte", "tokens", "bytes")} for r in records}
    for name, flag in ((target, "--target-set"), (general, "--general-set")):
        if name not in sets:
            raise ConfigError(f"{flag} {name}: not among the evaluated sets ({', '.join(sorted(sets))})")
    ref = reference or sets
    bpb = all(ref[n]["bits_per_byte"] is not None and sets[n]["bits_per_byte"] is not None for n in (target, general))
    metric = "bits_per_byte" if bpb else "loss"
    t0, t = ref[target][metric], sets[target][metric]
    g0, g = ref[general][metric], sets[general][metric]
    return {
        "alpha": alpha,
        "weights": [1.0 - alpha, alpha],
        "sets": sets,
        "target_set": target,
        "general_set": general,
        "metric": metric,
        "target_gain": t0 - t,
        "target_gain_rel": (t0 - t) / t0 if t0 else None,
        "general_change": g - g0,
        "general_change_rel": (g - g0) / g0 if g0 else None,
    }


def format_table(rows: list[dict]) -> str:
    """alpha | per set loss and bpb | target gain | general change (relative in parentheses)."""
    names = list(rows[0]["sets"])
    head = ["alpha"] + [f"{n} {c}" for n in names for c in ("loss", "bpb")]
    metric = "bpb" if rows[0]["metric"] == "bits_per_byte" else "loss"
    head += [f"{rows[0]['target_set']} gain ({metric})", f"{rows[0]['general_set']} change ({metric})"]

    def num(x, fmt=".4f"):
        return "-" if x is None else format(x, fmt)

    def rel(x):
        return "" if x is None else f" ({x:+.1%})"

    body = []
    for r in rows:
        cells = [f"{r['alpha']:g}"]
        for n in names:
            s = r["sets"].get(n, {})
            cells += [num(s.get("loss")), num(s.get("bits_per_byte"))]
        cells += [num(r["target_gain"], "+.4f") + rel(r["target_gain_rel"])]
        cells += [num(r["general_change"], "+.4f") + rel(r["general_change_rel"])]
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict], path: str) -> str:
    """Target gain (y) against general change (x), a point per alpha, labelled."""
    from megatron_ct.plotting import pyplot, save_png

    plt = pyplot()

    metric = "bits per byte" if rows[0]["metric"] == "bits_per_byte" else "loss per token"
    xs = [r["general_change"] for r in rows]
    ys = [r["target_gain"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.plot(xs, ys, "-", color="0.7", zorder=1)
    ax.scatter(xs, ys, c=[r["alpha"] for r in rows], cmap="viridis", zorder=2)
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(f"α={r['alpha']:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.axhline(0, color="0.85", lw=0.8)
    ax.axvline(0, color="0.85", lw=0.8)
    ax.set_xlabel(f"{rows[0]['general_set']}: {metric} change vs alpha=0 (right = forgetting)")
    ax.set_ylabel(f"{rows[0]['target_set']}: {metric} gain vs alpha=0 (up = better)")
    ax.set_title("base <-> CT interpolation: target gain vs general loss")
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def sweep(
    base: str,
    ct: str,
    alphas: Sequence[float],
    out_dir: str,
    *,
    evaluate: Evaluate,
    target_set: str,
    general_set: str,
    dtype: str | None = None,
    keep_checkpoints: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Merge, evaluate and summarise every alpha; writes ``sweep.jsonl`` and ``sweep.png`` into
    ``out_dir`` and returns the JSONL records (alpha order)."""
    alphas = check_alphas(alphas)
    jsonl, png = os.path.join(out_dir, "sweep.jsonl"), os.path.join(out_dir, "sweep.png")
    if os.path.exists(jsonl) and not overwrite:
        raise ConversionError(
            f"--output {out_dir}: already holds a sweep (sweep.jsonl); pass --overwrite to replace it"
        )
    os.makedirs(out_dir, exist_ok=True)
    evaluated: dict[float, list[dict]] = {}
    t_start = time.perf_counter()
    for n, alpha in enumerate(alphas, 1):
        t0 = time.perf_counter()
        work = os.path.join(out_dir, f"alpha_{alpha:g}")
        ckpt, logs = os.path.join(work, "checkpoint"), os.path.join(work, "eval")
        shutil.rmtree(work, ignore_errors=True)  # eval.jsonl is appended to: start clean
        merge_checkpoints([base, ct], [1.0 - alpha, alpha], ckpt, dtype=dtype, progress=progress)
        t1 = time.perf_counter()
        evaluated[alpha] = evaluate(ckpt, logs)
        if not keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
        done = time.perf_counter() - t_start
        eta = done / n * (len(alphas) - n)
        values = ", ".join(
            f"{r['set']} {r['loss']:.4f}" + (f"/{r['bits_per_byte']:.4f} bpb" if r.get("bits_per_byte") else "")
            for r in evaluated[alpha]
        )
        echo(
            f"[{n}/{len(alphas)}] alpha={alpha:g}: merged in {t1 - t0:.1f}s, evaluated in "
            f"{time.perf_counter() - t1:.1f}s ({values}); ETA {eta:.0f}s"
        )
    reference = summarize(0.0, evaluated[0.0], None, target_set, general_set)["sets"]
    rows = [summarize(a, evaluated[a], reference, target_set, general_set) for a in alphas]
    for r in rows:
        r["checkpoint"] = os.path.join(out_dir, f"alpha_{r['alpha']:g}", "checkpoint") if keep_checkpoints else None
    _write_jsonl(jsonl, rows)
    plot_tradeoff(rows, png)
    echo(format_table(rows))
    echo(f"wrote {jsonl} and {png}")
    return rows
