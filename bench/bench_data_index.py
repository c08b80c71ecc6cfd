#!/usr/bin/env python
"""Start-up cost of a large curriculum blend against megatron-core's BlendedMegatronDatasetBuilder.

Writes ``--datasets`` IndexedDatasets of ``--docs`` documents each (lognormal lengths around
``--mean-tokens``), as tools/preprocess_data.py leaves them: ``.idx``, a sparse ``.bin`` (building
indices reads no token) and the ``.meta.json`` sidecar (``--no-sidecar``: as upstream's tools
leave them, so the trainer scans each ``.bin`` for its largest id). Then, alternating in one
process (ours, megatron-core, megatron-core, ours, ...; ``--repeat`` pairs, fresh cache dirs):

* ours ``cold``: the trainer's start-up over all datasets in one stage (``check_startup``: open
  and validate every dataset (header, sizes, ``.idx`` hash), the largest-id and tokenizer
  checks; then ``build_data_source``: each dataset's epoch-0 index (shuffled order, cumulative
  lengths; with ``--packing by_source`` greedy pack boundaries too), written to the cache);
* megatron-core ``cold``: ``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` over the same
  prefixes and weights, asked for one epoch of samples (the blend's tokens / seq_length),
  building and caching its document, sample and shuffle indices and the blend index;
* ``warm`` for both: the same start with the cache present;
* ours ``plan``: assigning one global batch to datasets and stream positions (per step).

Prints the medians and the ratio ours/megatron-core (goal: at most 1.2x cold), and appends a
JSON line to ``{out_dir}/bench_data_index.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_datasets(root: str, count: int, docs: int, mean_tokens: int, sidecar: bool, seed: int = 0) -> dict[str, str]:
    from megatron_ct.data.indexed import DatasetMeta, meta_path, write_index, write_meta

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    tokenizer = {"file": "tokenizer.model", "sha256": "0" * 64, "vocab_size": 32000, "eod_id": 2, "probe": "0"}
    for i in range(count):
        prefix = os.path.join(root, f"ds{i:03d}_text_document")
        sigma = 1.0
        mu = np.log(mean_tokens) - sigma**2 / 2
        lengths = np.maximum(1, rng.lognormal(mu, sigma, docs)).astype(np.int32)
        sha = write_index(prefix + ".idx", np.uint16, lengths, np.arange(docs + 1, dtype=np.int64))
        with open(prefix + ".bin", "wb") as f:
            f.truncate(int(lengths.sum()) * 2)  # sparse: index building never reads tokens
        if sidecar:  # what tools/preprocess_data.py writes beside its outputs (ids: all 0 here)
            meta = DatasetMeta(docs, docs, int(lengths.sum()), 0, 0, tokenizer, "uint16", sha, int(lengths.sum()) * 2)
            write_meta(meta_path(prefix), meta)
        out[f"ds{i:03d}"] = prefix
    return out


def weights_of(datasets: dict[str, str]) -> list[float]:
    return np.random.default_rng(1).dirichlet(np.ones(len(datasets))).tolist()


def build_megatron(datasets: dict[str, str], cache_dir: str, args) -> None:
    """megatron-core's own blended builder over the same prefixes and weights, one epoch of samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokens = 0
    for prefix in datasets.values():
        with open(prefix + ".idx", "rb") as f:
            f.seek(18)
            n = int.from_bytes(f.read(8), "little")
            f.seek(34)
            tokens += int(np.fromfile(f, dtype=np.int32, count=n).sum(dtype=np.int64))
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=args.seq_length,
        blend=(list(datasets.values()), weights_of(datasets)),
        split="100,0,0",
        path_to_cache=cache_dir,
        tokenizer=SimpleNamespace(vocab_size=32000, eod=2, pad=0, unique_identifiers={"bench": 0}),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    BlendedMegatronDatasetBuilder(GPTDataset, [tokens // args.seq_length, 0, 0], lambda: True, config).build()


def build_source(datasets: dict[str, str], cache_dir: str, args):
    from megatron_ct.config.loader import build_config
    from megatron_ct.config.validate import validate_for_world
    from megatron_ct.data.batches import build_data_source
    from megatron_ct.training.startup import check_startup

    weights = np.array(weights_of(datasets))
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
    layout = validate_for_world(cfg, 1)
    startup = check_startup(cfg, layout)  # what the trainer does first: every dataset checked
    return build_data_source(cfg, layout, startup.schedule, 0, startup.cache)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=int, default=200)
    p.add_argument("--docs", type=int, default=20000, help="documents per dataset")
    p.add_argument("--mean-tokens", type=int, default=600, help="mean document length")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--global-batch-size", type=int, default=1024)
    p.add_argument(
        "--packing",
        choices=("concat", "by_source"),
        default="concat",
        help="ours: concat is what megatron-core's GPTDataset does; by_source packs whole documents",
    )
    p.add_argument(
        "--no-sidecar",
        dest="sidecar",
        action="store_false",
        help="datasets as upstream tools write them (the trainer scans each .bin once)",
    )
    p.add_argument("--repeat", type=int, default=3, help="alternating pairs of cold starts (default 3)")
    p.add_argument("--steps", type=int, default=20, help="steps to time the per-step plan over")
    p.add_argument("--out-dir", default="runs/bench_data_index")
    args = p.parse_args(argv)  # fmt: skip

    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    with warnings.catch_warnings():  # imports are not index time
        warnings.simplefilter("ignore")
        from megatron.core.datasets import blended_megatron_dataset_builder  # noqa: F401

        from megatron_ct.data import curriculum  # noqa: F401
    import torch.distributed as dist

    cold = {"ours": [], "megatron": []}
    warm = {"ours": [], "megatron": []}
    with tempfile.TemporaryDirectory() as tmp:
        # megatron-core's blended dataset asks torch.distributed for the rank: a one-process group.
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        t0 = time.perf_counter()
        datasets = write_datasets(os.path.join(tmp, "data"), args.datasets, args.docs, args.mean_tokens, args.sidecar)
        write_s = time.perf_counter() - t0
        builders = {
            "ours": lambda c: build_source(datasets, c, args),
            "megatron": lambda c: build_megatron(datasets, c, args),
        }
        for rep in range(args.repeat):
            for name in ("ours", "megatron") if rep % 2 == 0 else ("megatron", "ours"):
                cache = os.path.join(tmp, f"cache-{name}")
                shutil.rmtree(cache, ignore_errors=True)
                for times in (cold, warm):
                    t0 = time.perf_counter()
                    result = builders[name](cache)
                    times[name].append(time.perf_counter() - t0)
                if name == "ours":
                    assert result.cache.built == 0, "warm start rebuilt indices"
                    src = result
                print(
                    f"  pair {rep + 1} {name:8s}: cold {cold[name][-1]:6.2f} s, warm {warm[name][-1]:6.2f} s",
                    flush=True,
                )
        t0 = time.perf_counter()
        for _ in range(args.steps):
            src.plan()
        plan_ms = (time.perf_counter() - t0) / args.steps * 1000
        dist.destroy_process_group()

    med = {f"{kind}_{name}_s": round(statistics.median(t[name]), 3) for kind, t in (("cold", cold), ("warm", warm))
           for name in t}  # fmt: skip
    ratios = [o / m for o, m in zip(cold["ours"], cold["megatron"], strict=True)]
    total_docs = args.datasets * args.docs
    row = {
        "datasets": args.datasets,
        "docs": total_docs,
        "mean_tokens": args.mean_tokens,
        "packing": args.packing,
        "sidecar": args.sidecar,
        "seq_length": args.seq_length,
        "global_batch_size": args.global_batch_size,
        "repeat": args.repeat,
        "write_s": round(write_s, 2),
        **med,
        "cold_ratio": round(statistics.median(ratios), 3),
        "cold_ours_s_all": [round(x, 3) for x in cold["ours"]],
        "cold_megatron_s_all": [round(x, 3) for x in cold["megatron"]],
        "plan_ms_per_step": round(plan_ms, 1),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
    }
    print(f"machine: {row['cpu']}, {row['cpus']} CPUs, load average {row['loadavg_1m']:.2f}")
    sidecar = "yes" if args.sidecar else "no (.bin scanned)"
    print(f"{args.datasets} datasets, {total_docs:,} documents, packing={args.packing}, sidecar={sidecar}; "
          f"median of {args.repeat} alternating pairs")  # fmt: skip
    print(f"                       {'ours':>8} {'megatron-core':>14}")
    print(f"  cold start (build):   {med['cold_ours_s']:7.2f}s {med['cold_megatron_s']:13.2f}s   "
          f"ratio {row['cold_ratio']:.2f}x (goal <= 1.2x)")  # fmt: skip
    print(f"  warm start (cached):  {med['warm_ours_s']:7.2f}s {med['warm_megatron_s']:13.2f}s")
    print(f"  per-step plan (G={args.global_batch_size}): {plan_ms:8.1f} ms")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "bench_data_index.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
