"""What the hang watchdog's "last collective" record costs per training step.

    flock /tmp/cpu.lock python bench/bench_collective_trace.py

:func:`megatron_ct.training.watchdog.trace_collectives` wraps ``torch.distributed``'s collectives;
each call pays the wrapper (argument inspection, one small record). Measured here:

1. the wrapper's own time per call: a traced no-op with ``all_reduce``'s signature against the
   bare no-op, on a ``[1]`` tensor and on a list of 8 tensors, interleaved repeats, median;
2. the collectives a training step enters: the tiny LLaMA of the tests (tests/launch.py TINY) at
   TP2 with sequence parallelism (the most collectives per step of a 2-rank run: every layer's
   all-gather and reduce-scatter) and at DP2 with the distributed optimizer, counted on rank 0 as
   (calls in a 12-step run - calls in a 6-step run) / 6, and the median step time of the
   longer run (from its metrics.jsonl).

Per-step cost = calls per step x wrapper time per call. Printed with the machine line and appended as
JSONL to ``--out`` (default ``bench/results/collective_trace.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

CONFIGS = {
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "dp2_distopt": ["parallel.use_distributed_optimizer=true"],
}


def wrapper_ns_per_call(calls: int = 20000, repeats: int = 7) -> dict[str, float]:
    import torch

    from megatron_ct.training.watchdog import _traced

    def all_reduce(tensor, op=None, group=None, async_op=False):
        return None

    traced = _traced("all_reduce", all_reduce, torch.Tensor)
    one, many = torch.ones(1), [torch.ones(4) for _ in range(8)]
    out = {}
    for label, arg in (("tensor", one), ("list_of_8", many)):
        diffs = []
        for _ in range(repeats):
            times = []
            for fn in (all_reduce, traced):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(arg, group=None)
                times.append(time.perf_counter() - t0)
            diffs.append((times[1] - times[0]) / calls * 1e9)
        out[label] = statistics.median(diffs)
    return out


def count_worker(count_file: str, args: list[str]) -> int:
    """Under torchrun: trace and count collectives (before megatron-core is imported), train."""
    import functools

    import torch.distributed as dist

    from megatron_ct.training.watchdog import COLLECTIVES, trace_collectives

    trace_collectives()
    counts: dict[str, int] = {}

    def counted(op, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            counts[op] = counts.get(op, 0) + 1
            return fn(*a, **k)

        wrapper.megatron_ct_untraced = fn  # trace_collectives leaves it as it is
        return wrapper

    for op in COLLECTIVES:
        if hasattr(dist, op):
            setattr(dist, op, counted(op, getattr(dist, op)))
    import pretrain_ct

    rank = os.environ.get("RANK", "0")
    status = pretrain_ct.main(args)
    if rank == "0":
        Path(count_file).write_text(json.dumps(counts))
    return status


def train_counts(config: list[str], iters: int, folder: Path) -> tuple[dict[str, int], list[float]]:
    from megatron_ct.parallel.launch import child_env, free_port, torchrun_command

    from launch import TINY, read_metrics

    count_file = folder / f"counts{iters}.json"
    log_dir = folder / f"log{iters}"
    args = [*TINY, *config, f"train.train_iters={iters}", f"logging.log_dir={log_dir}", "logging.log_interval=1"]
    cmd = torchrun_command(2, __file__, ["--count-worker", str(count_file), *args], master_port=free_port())
    subprocess.run(cmd, check=True, cwd=REPO, env=child_env(threads=1), capture_output=True)
    steps = [r["step_time_s"] for r in read_metrics(log_dir) if r["iteration"] > 2 and "step_time_s" in r]
    return json.loads(count_file.read_text()), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "collective_trace.jsonl"))
    opts = parser.parse_args()
    from bench_train import machine

    record = {"machine": machine("cpu"), "date": time.strftime("%Y-%m-%d"), "wrapper_ns": wrapper_ns_per_call()}
    print(f"machine: {record['machine']}")
    print("wrapper per call: " + ", ".join(f"{k} {v:.0f} ns" for k, v in record["wrapper_ns"].items()))
    per_call = max(record["wrapper_ns"].values())
    for name, config in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            short, _ = train_counts(config, 6, Path(tmp))
            long, steps = train_counts(config, 12, Path(tmp))
        per_step = {op: (long.get(op, 0) - short.get(op, 0)) / 6 for op in long}
        per_step = {op: n for op, n in per_step.items() if n}
        calls = sum(per_step.values())
        step_ms = statistics.median(steps) * 1e3
        cost_us = calls * per_call / 1e3
        record[name] = {"calls_per_step": per_step, "step_ms": step_ms, "cost_us_per_step": cost_us}
        print(
            f"{name}: {calls:.0f} collectives per step ({per_step}), step {step_ms:.1f} ms, "
            f"tracing {cost_us:.1f} us per step ({cost_us / 1e3 / step_ms:.4%})"
        )
    with open(opts.out, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--count-worker":
        sys.exit(count_worker(sys.argv[2], sys.argv[3:]))
    main()
