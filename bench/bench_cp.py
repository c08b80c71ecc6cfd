"""Activation memory and step time against the context-parallel size, at a fixed global length.

    python bench/bench_cp.py                       # CP 1, 2, 4 at 4096 tokens, CPU (gloo)
    python bench/bench_cp.py --seq 8192 --cp 1 2   # other lengths / sizes

For each CP size, ``pretrain_ct``'s model (a small GQA LLaMA, FP32, sdpa attention) takes one
sequence of ``--seq`` tokens split over the CP ranks as training does
(megatron_ct/parallel/context.py), and runs forward + backward ``--steps`` times. Per rank it
records:

- activation memory: the bytes autograd saves for the backward during the forward (every saved
  tensor's storage counted once; the weights excluded), the memory context parallelism divides;
- of that, the gathered keys and values (every rank keeps each layer's full K and V for the
  backward; small under GQA);
- the median forward + backward time.

Expected: activation memory per rank falls about as 1 / CP, less the gathered K/V, which stay whole, and
FLOPs per rank as 1 / CP. On a machine with fewer cores than ranks the step time cannot fall
(ranks share the cores); the time column is meaningful where each rank has its own device or
cores. Results are printed with the machine and appended as JSONL to ``--out``.
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

MODEL = [
    "model.num_layers=2",
    "model.hidden_size=256",
    "model.num_attention_heads=8",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=704",
    "model.vocab_size=8000",
    "model.attention_backend=sdpa",
    "train.precision=fp32",
    "train.micro_batch_size=1",
    "train.global_batch_size=1",
    "parallel.device=cpu",
]


def worker(seq: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ct.config import load_config, validate_for_world
    from megatron_ct.model.llama import Numerics, build_model
    from megatron_ct.parallel.context import shard_batch
    from megatron_ct.parallel.distributed import init_distributed, read_launch_env, teardown_distributed

    env = read_launch_env()
    cfg = load_config(
        None,
        [
            *MODEL,
            f"model.max_position_embeddings={seq}",
            f"data.seq_length={seq}",
            f"parallel.context_parallel_size={env.world_size}",
        ],
    )
    layout = validate_for_world(cfg, env.world_size)
    init_distributed(cfg, layout, env)
    try:
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        model = build_model(cfg.model, layout, Numerics("fp32"))[0][0]
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        tokens = torch.randint(0, 8000, (1, seq + 1), generator=torch.Generator().manual_seed(1))
        batch = {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "position_ids": torch.arange(seq).unsqueeze(0),
        }
        part = shard_batch(batch, ps.get_context_parallel_world_size(), ps.get_context_parallel_rank())
        saved: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        times = []
        for _ in range(steps):
            saved.clear()
            dist.barrier()
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                losses = model(
                    input_ids=part["tokens"],
                    position_ids=part["position_ids"],
                    attention_mask=None,
                    labels=part["labels"],
                )
            losses.sum().backward()
            dist.barrier()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        cp = env.world_size
        groups, head_dim = cfg.model.num_query_groups, cfg.model.head_dim
        # K and V of every layer, FP32, kept whole for the backward
        kv_gathered = cfg.model.num_layers * 2 * seq * groups * head_dim * 4 if cp > 1 else 0
        record = {
            "rank": env.rank,
            "cp": cp,
            "seq": seq,
            "tokens_on_rank": part["tokens"].shape[1],
            "activation_bytes": sum(saved.values()),
            "gathered_kv_bytes": kv_gathered,
            "step_s": statistics.median(times[1:] if len(times) > 1 else times),
        }
        with open(os.path.join(out, f"rank{env.rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        teardown_distributed()


def machine() -> str:
    """The machine line every bench prints (bench_train.py's, for the CPU)."""
    from bench_train import machine as describe

    return describe("cpu")


def main() -> None:
    from megatron_ct.parallel.launch import child_env, free_port, torchrun_command

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=4096, help="global sequence length (a multiple of 2 * every CP size)")
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3, help="forward + backward passes per size; the first is warm-up")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_cp"), help="directory for bench_cp.jsonl")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(int(args.worker[0]), int(args.worker[1]), args.worker[2])
        return
    for cp in args.cp:
        if args.seq % (2 * cp):
            sys.exit(f"bench_cp.py: error: --seq {args.seq} is not a multiple of 2 * CP = {2 * cp}")
    print(f"machine: {machine()}")
    print(f"model: {' '.join(MODEL)}; one sequence of {args.seq} tokens")
    rows = []
    for cp in args.cp:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = torchrun_command(
                cp, Path(__file__), ["--worker", str(args.seq), str(args.steps), tmp], master_port=free_port()
            )
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=child_env(threads=max(1, (os.cpu_count() or 1) // cp))
            )
            if proc.returncode != 0:
                sys.exit(f"CP{cp} failed:\n{proc.stderr[-4000:]}")
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(cp)]
        row = {
            "cp": cp,
            "seq": args.seq,
            "tokens_per_rank": ranks[0]["tokens_on_rank"],
            "activation_mib_per_rank": max(r["activation_bytes"] for r in ranks) / 2**20,
            "gathered_kv_mib_per_rank": ranks[0]["gathered_kv_bytes"] / 2**20,
            "step_s": max(r["step_s"] for r in ranks),
        }
        rows.append(row)
    base = rows[0]
    print(
        f"{'CP':>3} {'tokens/rank':>11} {'activations MiB/rank':>21} {'vs first':>9} "
        f"{'gathered K/V MiB':>17} {'step s':>8}"
    )
    for r in rows:
        r["activation_ratio"] = r["activation_mib_per_rank"] / base["activation_mib_per_rank"]
        print(
            f"{r['cp']:>3} {r['tokens_per_rank']:>11} {r['activation_mib_per_rank']:>21.1f} "
            f"{r['activation_ratio']:>9.3f} "
            f"{r['gathered_kv_mib_per_rank']:>17.1f} {r['step_s']:>8.2f}"
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_cp.jsonl"), "a") as f:
        f.write(json.dumps({"machine": machine(), "rows": rows, "time": time.time()}) + "\n")


if __name__ == "__main__":
    main()
