#!/usr/bin/env python
"""Plot a run: training loss and every validation set's bits per byte over iterations (and, when
the run scored downstream tasks, their accuracy per task in ``<output>_downstream.png``).

    python tools/plot_run.py runs/curriculum_3stage            # -> runs/curriculum_3stage/run.png
    python tools/plot_run.py RUN_DIR --output plot.png --title "zh CT"

Reads ``metrics.jsonl`` (training steps) and ``eval.jsonl`` (validation sets) that
pretrain_ct.py writes into its log directory. Curriculum stage boundaries (the ``stage``
field the trainer logs) are drawn as vertical lines and labelled; each set's value at
iteration 0 (the evaluation before the first update) as a dotted horizontal line. After a
vocabulary expansion that is the *expanded* model, not the base the run started from: give the
original base's bits per byte (measured with its own tokenizer, tools/eval_bpb.py) with
``--reference SET=BPB`` and it is drawn as a second, broad solid line, the one CT has to beat.
Bits per byte is the tokenizer-independent measure; sets without it (no ``data.tokenizer``)
fall back to loss per token, said in the legend.

    python tools/plot_run.py runs/ct --reference zh=2.626 --reference en=1.366
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, check_output_file, run_cli  # noqa: E402
from megatron_ct.errors import DataError  # noqa: E402

# The fields each log's records need: metrics.jsonl (training steps), eval.jsonl (validation).
NEEDED = {
    "metrics.jsonl": ("iteration", "loss"),
    "eval.jsonl": ("iteration", "set", "loss"),
    "downstream.jsonl": ("iteration", "task", "metric", "value"),
}


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    needed = NEEDED.get(os.path.basename(path), ("iteration",))
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n}: not a JSON line; expected the records pretrain_ct.py logs") from None
            missing = [k for k in needed if k not in row] if isinstance(row, dict) else needed
            if missing:
                raise DataError(f"{path}:{n}: no {', '.join(missing)}; expected a record with {', '.join(needed)}")
            rows.append(row)
    return rows


def stage_starts(train: list[dict], evals: list[dict]) -> list[tuple[int, str]]:
    """(first iteration, stage name) for each stage seen, from training records (or evals)."""
    starts, last = [], object()
    for r in sorted(train or evals, key=lambda r: r["iteration"]):
        stage = r.get("stage")
        if stage is not None and stage != last:
            starts.append((r["iteration"], str(stage)))
            last = stage
    return starts


def eval_series(evals: list[dict], references: dict[str, float] | None = None) -> list[tuple[str, str, list, list]]:
    """What the validation panel draws: (set, label, iterations, values) per curve; a horizontal
    line has no iterations. Per set: its curve, its value at iteration 0, the original base."""
    by_set: dict[str, list[dict]] = defaultdict(list)
    for r in evals:
        by_set[r["set"]].append(r)
    out = []
    for name, rows in sorted(by_set.items()):
        rows.sort(key=lambda r: r["iteration"])
        bpb = all(r.get("bits_per_byte") is not None for r in rows)
        key = "bits_per_byte" if bpb else "loss"
        label = name + ("" if bpb else " (loss/token)")
        out.append((name, label, [r["iteration"] for r in rows], [r[key] for r in rows]))
        base = next((r for r in rows if r.get("trigger") == "baseline"), None)
        if base is not None:  # the model the run started from (after any resize): what CT changed
            out.append((name, f"{name} at iteration 0", [], [base[key]]))
        if bpb and name in (references or {}):
            out.append((name, f"{name} original base (own tokenizer)", [], [references[name]]))
    unknown = sorted(set(references or {}) - set(by_set))
    if unknown:
        expected = ", ".join(sorted(by_set))
        raise DataError(f"--reference {unknown[0]}: no such validation set; expected one of {expected}")
    return out


def plot(run_dir: str, output: str, title: str | None = None, references: dict[str, float] | None = None) -> str:
    from megatron_ct.plotting import pyplot, save_png

    plt = pyplot()

    train = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    if not train and not evals:
        raise DataError(f"{run_dir}: no metrics.jsonl or eval.jsonl (expected a pretrain_ct.py log directory)")
    series = eval_series(evals, references)

    fig, (ax_loss, ax_eval) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    if train:
        ax_loss.plot([r["iteration"] for r in train], [r["loss"] for r in train], lw=1.2, label="train loss")
        ax_loss.legend(loc="upper right")
    ax_loss.set_ylabel("loss per token (nats)")

    colors: dict[str, str] = {}
    for name, label, xs, ys in series:
        if xs:
            (line,) = ax_eval.plot(xs, ys, marker="o", ms=3, label=label)
            colors[name] = line.get_color()
        elif label.endswith("iteration 0"):
            ax_eval.axhline(ys[0], color=colors[name], ls=":", lw=1.0, label=label)
        else:  # the original base: the line CT has to get below
            ax_eval.axhline(ys[0], color=colors[name], ls="-", lw=2.5, alpha=0.35, label=label)
    ax_eval.set_ylabel("validation bits per byte")
    ax_eval.set_xlabel("iteration")
    if series:
        ax_eval.legend(loc="upper right", fontsize=8)

    for i, (it, name) in enumerate(stage_starts(train, evals)):
        for ax in (ax_loss, ax_eval):
            if i > 0:
                ax.axvline(it - 0.5, color="gray", ls="--", lw=0.8)
        ax_loss.annotate(name, (it, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8, color="gray")
    fig.suptitle(title or os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    return save_png(fig, output, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(__file__, __doc__)
    parser.add_argument("run_dir", help="log directory of a run (holds metrics.jsonl / eval.jsonl)")
    parser.add_argument("--output", help="PNG path (default RUN_DIR/run.png)")
    parser.add_argument("--title")
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="SET=BPB",
        help="the original base's bits per byte on a validation set (its own tokenizer), drawn as a line",
    )
    return run_cli(parser, draw, argv, expected=(OSError,))


def draw(args) -> None:
    if args.output:
        check_output_file(args.output, "--output")
    output = args.output or os.path.join(args.run_dir, "run.png")
    references = {}
    for item in args.reference:
        name, _, value = item.partition("=")
        try:
            references[name] = float(value)
        except ValueError:
            raise DataError(f"--reference {item}: not SET=BPB; expected e.g. zh=2.63") from None
    print(plot(args.run_dir, output, args.title, references))
    downstream = read_jsonl(os.path.join(args.run_dir, "downstream.jsonl"))
    if downstream:  # the in-loop downstream tasks: one panel per task, beside the run's plot
        from megatron_ct.evaluation.plot import plot_downstream

        print(plot_downstream(downstream, os.path.splitext(output)[0] + "_downstream.png", args.title))


if __name__ == "__main__":
    sys.exit(main())
