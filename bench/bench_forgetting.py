"""Forgetting levers on a real base: uniform vs decoupled learning rates, and the merge frontier.

    python examples/quickstart/run.py                  # once: SmolLM2-135M expanded for Chinese
    python bench/bench_forgetting.py                   # reads runs/quickstart, writes runs/bench_forgetting

From the quickstart's expanded SmolLM2 checkpoint (iteration 0) and its zh/en datasets, two
runs of the same steps on the same zh/en mix:

- ``uniform``:   every parameter at the LR (what most CT recipes do);
- ``decoupled``: embeddings and output at the LR, the body at ``--body-mult`` of it
  (``train.lr_mult``; the setting a tokenizer-extension study found to keep English).

Each run's validation sets are evaluated at iteration 0 (the base line) and at the end; the
table gives target (zh) and general (en) bits per byte and their change. Then
``tools/merge_checkpoints.py --sweep-alphas`` interpolates iteration 0 and the uniform run's
result and evaluates each alpha: the frontier of target gain against general change. Results:
``bench_forgetting.jsonl`` and the sweep's ``sweep.jsonl``/``sweep.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(li.split(":", 1)[1].strip() for li in open("/proc/cpuinfo") if li.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def recipe(quickstart: Path, steps: int) -> dict:
    """The quickstart's recipe reduced to one mixed zh/en stage of ``steps`` steps."""
    cfg = yaml.safe_load((quickstart / "curriculum.yaml").read_text())
    mixed = next(s for s in cfg["data"]["stages"] if s["name"] == "mixed")
    mixed = {k: v for k, v in mixed.items() if k not in ("lr_mult", "lr_rewarm_iters", "iters", "tokens")}
    cfg["data"]["stages"] = [mixed]
    cfg["train"]["train_iters"] = steps
    cfg["optim"].update(lr_warmup_iters=1, lr_decay_style="constant")
    cfg["checkpoint"].pop("save", None)
    return cfg


def train(cfg: dict, out: Path) -> dict[str, dict]:
    """Run the trainer; per validation set, its base-line and last evaluation records."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "checkpoint": {**cfg["checkpoint"], "save": str(out / "ckpt")}, "logging": {"log_dir": str(out)}}
    (out / "recipe.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    cmd = [sys.executable, str(REPO / "pretrain_ct.py"), "--config", str(out / "recipe.yaml")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"training failed, see {out / 'train.log'}:\n{proc.stderr[-3000:]}")
    records: dict[str, dict] = {}
    for line in (out / "eval.jsonl").read_text().splitlines():
        r = json.loads(line)
        entry = records.setdefault(r["set"], {})
        entry.setdefault("base", r)
        entry["last"] = r
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", type=Path, default=REPO / "runs" / "quickstart", help="quickstart output")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_forgetting")
    ap.add_argument("--steps", type=int, default=12, help="training steps of each run (default 12)")
    ap.add_argument("--lr", type=float, default=2e-3, help="the LR (default 2e-3)")
    ap.add_argument("--body-mult", type=float, default=0.1, help="decoupled: the body's LR multiplier (default 0.1)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    args = ap.parse_args()
    if not (args.quickstart / "curriculum.yaml").is_file():
        sys.exit(f"{args.quickstart}: no quickstart output; run `python examples/quickstart/run.py` first")
    shutil.rmtree(args.out, ignore_errors=True)
    base = recipe(args.quickstart, args.steps)
    base["optim"]["lr"] = args.lr
    print(f"machine: {machine()}")
    print(f"base: {base['checkpoint']['load']}; {args.steps} steps of zh/en {base['data']['stages'][0]['blend']}")
    results, t0 = {}, time.perf_counter()
    for name, lr_mult in (("uniform", None), ("decoupled", {"body": args.body_mult})):
        cfg = json.loads(json.dumps(base))
        if lr_mult:
            cfg["train"]["lr_mult"] = lr_mult
        results[name] = train(cfg, args.out / name)
        print(f"  {name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\n{'run':10} {'set':4} {'base bpb':>9} {'after':>8} {'change':>8}")
    rows = []
    for name, sets in results.items():
        for s, rec in sets.items():
            b, a = rec["base"]["bits_per_byte"], rec["last"]["bits_per_byte"]
            rows.append({"run": name, "set": s, "base_bpb": b, "after_bpb": a, "change_rel": a / b - 1})
            print(f"{name:10} {s:4} {b:>9.4f} {a:>8.4f} {100 * (a / b - 1):>+7.2f}%")

    print("\nmerge sweep: iteration 0 <-> uniform result (tools/merge_checkpoints.py --sweep-alphas)")
    sweep_out = args.out / "sweep"
    cmd = [
        sys.executable,
        str(REPO / "tools/merge_checkpoints.py"),
        "--sweep-alphas",
        *map(str, args.alphas),
        "--base",
        base["checkpoint"]["load"],
        "--ct",
        str(args.out / "uniform" / "ckpt"),
        "--recipe",
        str(args.out / "uniform" / "recipe.yaml"),
        "--target-set",
        "zh",
        "--general-set",
        "en",
        "--output",
        str(sweep_out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    print(proc.stdout[-3000:])
    if proc.returncode != 0:
        sys.exit(f"sweep failed:\n{proc.stderr[-3000:]}")
    with open(args.out / "bench_forgetting.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "machine": machine(),
                    "steps": args.steps,
                    "lr": args.lr,
                    "body_mult": args.body_mult,
                    "rows": rows,
                    "time": time.time(),
                }
            )
            + "\n"
        )
    print(f"results: {args.out / 'bench_forgetting.jsonl'}, {sweep_out / 'sweep.jsonl'}, {sweep_out / 'sweep.png'}")


if __name__ == "__main__":
    main()
