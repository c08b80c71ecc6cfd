#!/usr/bin/env python
"""Start-up cost of a large curriculum blend: index building, cold vs cached, and per-step cost.

Writes ``--datasets`` megatron-core IndexedDatasets of ``--docs`` documents each (lognormal
lengths around ``--mean-tokens``; the ``.bin`` files are sparse, since building indices only
reads the ``.idx``), blends them all in one stage and times, in one process:

* ``cold``: opening every dataset and building its epoch-0 index (shuffled order, cumulative
  lengths and, with ``--packing by_source``, greedy pack boundaries), writing the cache;
* ``warm``: the same start with the cache present (what every later start and every rank
  after rank 0 pays);
* ``plan``: assigning one global batch of ``--global-batch-size`` samples to datasets and
  stream positions (the per-step work every rank repeats; tokens are not read).

Prints a table and appends a JSON line to ``{out_dir}/bench_data_index.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_datasets(root: str, count: int, docs: int, mean_tokens: int, seed: int = 0) -> dict[str, str]:
    from megatron.core.datasets.indexed_dataset import _IndexWriter

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for i in range(count):
        prefix = os.path.join(root, f"ds{i:03d}_text_document")
        sigma = 1.0
        mu = np.log(mean_tokens) - sigma**2 / 2
        lengths = np.maximum(1, rng.lognormal(mu, sigma, docs)).astype(np.int32)
        with _IndexWriter(prefix + ".idx", np.uint16) as w:
            w.write(lengths, None, np.arange(docs + 1, dtype=np.int64))
        with open(prefix + ".bin", "wb") as f:
            f.truncate(int(lengths.sum()) * 2)  # sparse: index building never reads tokens
        out[f"ds{i:03d}"] = prefix
    return out


def build_source(datasets: dict[str, str], cache_dir: str, args):
    from megatron_ct.config.loader import build_config
    from megatron_ct.config.validate import validate_for_world
    from megatron_ct.data.curriculum import CurriculumSource

    weights = np.random.default_rng(1).dirichlet(np.ones(len(datasets)))
    cfg = build_config(
        {
            "train": {"global_batch_size": args.global_batch_size, "micro_batch_size": 1, "train_iters": 10},
            "model": {"max_position_embeddings": args.seq_length},
            "data": {
                "seq_length": args.seq_length,
                "datasets": datasets,
                "stages": [
                    {
                        "name": "blend",
                        "blend": dict(zip(datasets, weights.tolist(), strict=True)),
                        "packing": args.packing,
                    }
                ],
                "index_cache_dir": cache_dir,
            },
        }
    )
    return CurriculumSource(cfg, validate_for_world(cfg, 1), 0, "cpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=int, default=200)
    p.add_argument("--docs", type=int, default=20000, help="documents per dataset")
    p.add_argument("--mean-tokens", type=int, default=600, help="mean document length")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--global-batch-size", type=int, default=1024)
    p.add_argument("--packing", choices=("concat", "by_source"), default="by_source")
    p.add_argument("--steps", type=int, default=20, help="steps to time the per-step plan over")
    p.add_argument("--out-dir", default="runs/bench_data_index")
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from megatron.core.datasets import indexed_dataset  # noqa: F401  (import time is not index time)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        datasets = write_datasets(os.path.join(tmp, "data"), args.datasets, args.docs, args.mean_tokens)
        write_s = time.perf_counter() - t0
        cache = os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        build_source(datasets, cache, args)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        src = build_source(datasets, cache, args)
        warm_s = time.perf_counter() - t0
        assert src.cache.built == 0, "warm start rebuilt indices"
        t0 = time.perf_counter()
        for k in range(args.steps):
            src.plan(k)
        plan_ms = (time.perf_counter() - t0) / args.steps * 1000

    total_docs = args.datasets * args.docs
    row = {
        "datasets": args.datasets,
        "docs": total_docs,
        "mean_tokens": args.mean_tokens,
        "packing": args.packing,
        "seq_length": args.seq_length,
        "global_batch_size": args.global_batch_size,
        "write_s": round(write_s, 2),
        "cold_s": round(cold_s, 2),
        "warm_s": round(warm_s, 2),
        "plan_ms_per_step": round(plan_ms, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(f"{args.datasets} datasets, {total_docs:,} documents, packing={args.packing}")
    print(f"  cold start (build + cache):   {cold_s:8.2f} s")
    print(f"  warm start (cached indices):  {warm_s:8.2f} s")
    print(f"  per-step plan (G={args.global_batch_size}):     {plan_ms:8.1f} ms")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "bench_data_index.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
