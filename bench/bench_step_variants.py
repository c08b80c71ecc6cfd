"""Our replacements of megatron-core's per-call work, each against megatron-core's own, in one process.

    python bench/bench_step_variants.py --pairs 20        # the CPU bench shape of bench_train.py

The model of ``bench_train.py --device cpu`` is built once, wrapped in DDP as the trainer wraps
it, and runs 4 micro-batches of forward and backward into the DDP buffers per "step" (no
optimizer: it is the same for every variant). The variants differ only in the classes of some
layers, swapped on the same instances, so weights, data and buffers are the same:

- ``ours``: as built (``model/linear.py``'s lean TP-1 linear layers, ``model/embedding.py``'s
  embedding gradient into the DDP buffer);
- ``megatron-linears``: megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear``;
- ``megatron-embedding``: megatron-core's ``VocabParallelEmbedding``;
- ``megatron-both``: both of megatron-core's.

Steps alternate between the variants (A B C D, then D C B A, ...), so a slow phase of a shared
machine falls on all of them. Prints per variant the median step time and the median of its
per-round ratio to ``ours``, with the machine, and appends a JSON line to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def build(shape: dict):
    import torch
    import torch.distributed as dist
    from bench_train import shape_overrides
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_ct.config import load_config, validate_for_world
    from megatron_ct.model.llama import Numerics, build_model
    from megatron_ct.parallel.device import activate_cpu_device_layer
    from megatron_ct.training.optimizer import wrap_ddp

    activate_cpu_device_layer()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg = load_config(None, [*shape_overrides(shape), "parallel.device=cpu"])
    layout = validate_for_world(cfg, 1)
    chunks, _ = build_model(cfg.model, layout, Numerics(ddp=True))
    return wrap_ddp(chunks, layout)[0], torch


def variants(model) -> dict:
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

    from megatron_ct.model.embedding import AccumulatingVocabParallelEmbedding
    from megatron_ct.model.linear import LeanColumnParallelLinear, LeanRowParallelLinear

    linears = {m: type(m) for m in model.modules() if type(m) in (LeanColumnParallelLinear, LeanRowParallelLinear)}
    embeddings = [m for m in model.modules() if type(m) is AccumulatingVocabParallelEmbedding]
    if not linears or not embeddings:
        sys.exit("error: the model has no lean linear layers or no accumulating embedding: nothing to compare")

    def setting(lean_linears: bool, accumulating_embedding: bool):
        def apply() -> None:
            for m, cls in linears.items():
                m.__class__ = cls if lean_linears else cls.__mro__[1]
            for m in embeddings:
                m.__class__ = AccumulatingVocabParallelEmbedding if accumulating_embedding else VocabParallelEmbedding

        return apply

    return {
        "ours": setting(True, True),
        "megatron-linears": setting(False, True),
        "megatron-embedding": setting(True, False),
        "megatron-both": setting(False, False),
    }


def main() -> None:
    from bench_train import SHAPES, machine

    from megatron_ct.jsonl import JsonlLog

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20, help="rounds; each runs every variant once")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_step_variants"), help="directory for the JSONL")
    args = ap.parse_args()
    if args.pairs < 2:
        sys.exit("error: --pairs (command line): expected at least 2")
    warnings.filterwarnings("ignore")
    shape = SHAPES["cpu"]
    model, torch = build(shape)
    from megatron_ct.parallel.device import rewrites_suspended

    mbs, gbs, s, vocab = shape["micro_batch_size"], shape["global_batch_size"], shape["seq_length"], shape["vocab_size"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (gbs // mbs, mbs, s + 1), generator=g)
    positions = torch.arange(s).expand(mbs, -1)

    def step() -> float:
        t0 = time.perf_counter()
        model.zero_grad_buffer()
        for mb in tokens:
            with rewrites_suspended():
                loss = model(mb[:, :-1], positions, attention_mask=None, labels=mb[:, 1:])
            (loss.sum() / (gbs * s)).backward()
        return time.perf_counter() - t0

    table = variants(model)
    names = list(table)
    for name in names:  # warm-up: every variant's first steps
        table[name]()
        step(), step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.pairs):
        for name in names if r % 2 == 0 else names[::-1]:
            table[name]()
            times[name].append(step())
        line = ", ".join(f"{n} {times[n][-1] * 1e3:.1f} ms" for n in names)
        print(f"round {r + 1}/{args.pairs}: {line}", flush=True)
    where = machine("cpu")
    print(f"\n{where}; {args.pairs} rounds, 4 micro-batches forward + backward per step")
    print(f"{'variant':20s} {'ms/step':>8s} {'vs ours':>8s}")
    rows = []
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(times[name], times["ours"], strict=True))
        med = statistics.median(times[name])
        rows.append({"variant": name, "step_s": med, "ratio_to_ours": ratio})
        print(f"{name:20s} {med * 1e3:8.1f} {ratio:8.3f}")
    log = JsonlLog(str(Path(args.out) / "bench_step_variants.jsonl"))
    log.write({"machine": where, "shape": shape, "rounds": args.pairs, "rows": rows, "time": time.time()})
    log.close()


if __name__ == "__main__":
    main()
