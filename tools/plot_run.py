#!/usr/bin/env python
"""Plot a run: training loss and every validation set's bits per byte over iterations.

    python tools/plot_run.py runs/curriculum_3stage            # -> runs/curriculum_3stage/run.png
    python tools/plot_run.py RUN_DIR --output plot.png --title "zh CT"

Reads ``metrics.jsonl`` (training steps) and ``eval.jsonl`` (validation sets) that
pretrain_ct.py writes into its log directory. Curriculum stage boundaries (the ``stage``
field the trainer logs) are drawn as vertical lines and labelled; each set's base-line value
(the evaluation before the first update) as a dotted horizontal line. Bits per byte is the
tokenizer-independent measure; sets without it (no ``data.tokenizer``) fall back to loss
per token, said in the legend.
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
NEEDED = {"metrics.jsonl": ("iteration", "loss"), "eval.jsonl": ("iteration", "set", "loss")}


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


def plot(run_dir: str, output: str, title: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    if not train and not evals:
        raise DataError(f"{run_dir}: no metrics.jsonl or eval.jsonl (expected a pretrain_ct.py log directory)")

    fig, (ax_loss, ax_eval) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    if train:
        ax_loss.plot([r["iteration"] for r in train], [r["loss"] for r in train], lw=1.2, label="train loss")
    ax_loss.set_ylabel("loss per token (nats)")
    ax_loss.legend(loc="upper right")

    by_set: dict[str, list[dict]] = defaultdict(list)
    for r in evals:
        by_set[r["set"]].append(r)
    for name, rows in sorted(by_set.items()):
        rows.sort(key=lambda r: r["iteration"])
        bpb = all(r.get("bits_per_byte") is not None for r in rows)
        ys = [r["bits_per_byte"] if bpb else r["loss"] for r in rows]
        (line,) = ax_eval.plot(
            [r["iteration"] for r in rows], ys, marker="o", ms=3, label=name + ("" if bpb else " (loss/token)")
        )
        base = next((r for r in rows if r.get("trigger") == "baseline"), None)
        if base is not None:  # the base model's value: how much CT gained or lost on this set
            y = base["bits_per_byte"] if bpb else base["loss"]
            ax_eval.axhline(y, color=line.get_color(), ls=":", lw=1.0, label=f"{name} base")
    ax_eval.set_ylabel("validation bits per byte")
    ax_eval.set_xlabel("iteration")
    if by_set:
        ax_eval.legend(loc="upper right")

    for i, (it, name) in enumerate(stage_starts(train, evals)):
        for ax in (ax_loss, ax_eval):
            if i > 0:
                ax.axvline(it - 0.5, color="gray", ls="--", lw=0.8)
        ax_loss.annotate(name, (it, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8, color="gray")
    fig.suptitle(title or os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    tmp = output + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, output)  # never a half-written PNG under the final name
    return output


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(__file__, __doc__)
    parser.add_argument("run_dir", help="log directory of a run (holds metrics.jsonl / eval.jsonl)")
    parser.add_argument("--output", help="PNG path (default RUN_DIR/run.png)")
    parser.add_argument("--title")
    return run_cli(parser, draw, argv, expected=(OSError,))


def draw(args) -> None:
    if args.output:
        check_output_file(args.output, "--output")
    print(plot(args.run_dir, args.output or os.path.join(args.run_dir, "run.png"), args.title))


if __name__ == "__main__":
    sys.exit(main())
