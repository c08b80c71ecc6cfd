#!/usr/bin/env python
"""Plot a run: training loss and every validation set's bits per byte over iterations (and, when
the run scored downstream tasks, their accuracy per task in ``<output>_downstream.png``; for a
mixture of experts, the routers' health in ``<output>_router.png``: the load-balancing loss and
z-loss, and one heat map per layer of each expert's share of the token slots over iterations).

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


def router_series(train: list[dict]) -> tuple[list[int], list[list[list[float]]]]:
    """Iterations and expert load ``[record][layer][expert]`` of the records that have one
    (megatron_ct/training/router_health.py), scaled so that 1 is an even share (1/E)."""
    rows = [r for r in train if r.get("moe_expert_load")]
    loads = [[[f * len(layer) for f in layer] for layer in r["moe_expert_load"]] for r in rows]
    return [r["iteration"] for r in rows], loads


def plot_router(train: list[dict], output: str, title: str | None = None) -> str:
    """The routers' health of a mixture-of-experts run: losses on top, then per layer a heat map
    (iteration x expert) of the load relative to an even share; 0 (a dead expert) is black."""
    import numpy as np

    from megatron_ct.plotting import pyplot, save_png

    plt = pyplot()
    iterations, loads = router_series(train)
    load = np.array(loads)  # [records, L, E]
    layers = load.shape[1]
    cols = min(layers, 4)
    rows = (layers + cols - 1) // cols
    fig = plt.figure(figsize=(3.2 * cols + 1.5, 2.8 + 2.2 * rows), layout="constrained")
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1.3] + [1] * rows)
    ax = fig.add_subplot(grid[0, :])
    handles = []
    for key, label, axis, color in (
        ("moe_aux_loss", "load-balancing loss (1: balanced)", ax, "C0"),
        ("moe_z_loss", "z-loss (right axis)", None, "C1"),
    ):
        points = [(r["iteration"], r[key]) for r in train if r.get(key) is not None]
        if points:
            axis = axis or ax.twinx()  # its own scale: the squared log-sum-exp of the logits
            handles += axis.plot(*zip(*points, strict=True), lw=1.2, color=color, label=label)
    dropped = sum(r.get("moe_dropped_tokens") or 0 for r in train)
    if dropped:
        handles += ax.plot([], [], " ", label=f"token slots dropped: {dropped} in all")
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title("router losses (mean over layers)", fontsize=9)
    ax.set_xlabel("iteration", fontsize=8)
    # Cell edges halfway between logged iterations (log steps need not be evenly spaced).
    its = np.array(iterations, dtype=float)
    mids = (its[1:] + its[:-1]) / 2 if len(its) > 1 else np.array([])
    edges = np.concatenate([[its[0] - 0.5], mids, [its[-1] + 0.5]])
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_under("black")
    vmax = max(2.0, float(load.max()))
    for layer in range(layers):
        ax_l = fig.add_subplot(grid[1 + layer // cols, layer % cols])
        mesh = ax_l.pcolormesh(
            edges, np.arange(load.shape[2] + 1) - 0.5, load[:, layer, :].T, cmap=cmap, vmin=1e-9, vmax=vmax
        )
        ax_l.set_title(f"layer {layer}", fontsize=8)
        ax_l.set_ylabel("expert", fontsize=8)
        if layer // cols == rows - 1:
            ax_l.set_xlabel("iteration", fontsize=8)
        ax_l.tick_params(labelsize=7)
    heat_maps = [a for a in fig.axes if a.get_title().startswith("layer ")]
    fig.colorbar(mesh, ax=heat_maps, shrink=0.9, label="load / even share (black: none)")
    fig.suptitle(f"{title}: router health" if title else "router health")
    return save_png(fig, output, dpi=120)


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
    train = read_jsonl(os.path.join(args.run_dir, "metrics.jsonl"))
    if any(r.get("moe_expert_load") for r in train):  # a mixture of experts: its routers
        print(plot_router(train, os.path.splitext(output)[0] + "_router.png", args.title))


if __name__ == "__main__":
    sys.exit(main())
