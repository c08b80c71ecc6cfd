"""Training throughput of an upcycled mixture of experts against its dense base, alternated.

    flock /tmp/cpu.lock python bench/bench_moe.py --pairs 6     # CPU, bench_train.py's tiny LLaMA
    python bench/bench_moe.py --num-experts 4 --topk 2          # other upcycles
    python bench/bench_moe.py --num-experts 8 --topk 2 --granularity 2   # equal active parameters

A dense LLaMA (bench_train.py's CPU shape, vocabulary 8000) is initialised once (``pretrain_ct.py`` with 0 steps)
and upcycled with :func:`megatron_ct.expansion.upcycle.upcycle` (what ``tools/upcycle_moe.py``
runs): every MLP copied into ``--num-experts`` experts of the same width, a router per layer,
``--topk`` experts per token (default 8 and 2, Mixtral's). With full-width copies a token passes
2 MLPs' worth of weights (top-1 is refused: the renormalised weight of one expert is always 1, so
its router gets no gradient). ``--granularity G`` makes each expert 1/G of the MLP (fine-grained
upcycling); with ``--topk G`` the MoE has the dense model's active parameters (plus the routers).
The bench prints active and total parameters and training FLOPs per token of both models, and
besides the tokens/s ratio the ratio of achieved FLOP/s (tokens/s x FLOPs per token): what the
MoE's routing and sequential experts cost per unit of active compute.

Both models train from their checkpoints (weights only) on the synthetic stream with the same
batch, alternately (A B A B ..., ``--pairs`` pairs), each in a fresh ``python pretrain_ct.py``
process; a run's figure is its median step time after 2 warm-up steps (from its
metrics.jsonl: evaluation and checkpoint time excluded). Reported: tokens/s of each, and the
median over pairs of the ratio MoE/dense tokens/s (< 1: the MoE is slower) with a bootstrap
interval. The MoE trains with megatron-core's load-balancing loss (``--aux-loss``, default 0.01)
and its all-to-all token dispatcher on one rank. Printed with the machine line and appended as
JSONL to ``--out`` (default ``bench/results/moe/bench_moe.jsonl``).
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

from bench_train import SHAPES, machine, median_interval, shape_overrides  # noqa: E402

from megatron_ct.parallel.launch import child_env  # noqa: E402

SHAPE = {**SHAPES["cpu"], "vocab_size": 8000}  # the shape of the committed MoE figures (bench/README.md)
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size")


def common_overrides(iters: int) -> list[str]:
    return [
        *shape_overrides(SHAPE),
        f"train.train_iters={iters}",
        "parallel.device=cpu",
    ]


def pretrain(overrides: list[str]) -> None:
    """One plain ``python pretrain_ct.py`` process (as bench_train.py runs one rank)."""
    cmd = [sys.executable, str(REPO / "pretrain_ct.py"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"pretrain_ct.py failed:\n{proc.stderr[-4000:]}")


def step_times(ckpt: str, model: list[str], iters: int) -> list[float]:
    """Step times (s) of one training run from ``ckpt`` (weights only), from its metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        load = [f"checkpoint.load={ckpt}", "checkpoint.load_weights_only=true", f"logging.log_dir={tmp}"]
        pretrain([*common_overrides(iters), *model, *load])
        return [json.loads(li)["step_time_s"] for li in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]


def counts(model_overrides: list[str]) -> dict:
    """Total and active parameters (a token passes ``moe_router_topk`` of the experts) and
    training FLOPs per token of a model given as overrides on the bench shape."""
    from megatron_ct.config import load_config
    from megatron_ct.families import family_of

    m = load_config(None, [*(f"model.{k}={SHAPE[k]}" for k in MODEL_KEYS), *model_overrides]).model
    family = family_of(m)
    padded = ((m.vocab_size + 127) // 128) * 128
    total = active = 0
    for key, shape in family.ct_shapes(m, padded).items():
        n = 1
        for s in shape:
            n *= s
        total += n
        active += n * m.moe_router_topk // m.num_experts if ".experts." in key else n
    return {
        "params": total,
        "active_params": active,
        "flops_per_token": family.flops_per_token(m, SHAPE["seq_length"], padded),
    }


def main() -> None:
    from megatron_ct.expansion.upcycle import upcycle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-experts", type=int, default=8, help="experts per layer of the upcycled model (E)")
    ap.add_argument("--topk", type=int, default=2, help="experts per token (k >= 2)")
    ap.add_argument("--granularity", type=int, default=1, help="slices per MLP (1: full-width copies)")
    ap.add_argument("--aux-loss", type=float, default=0.01, help="model.moe_aux_loss_coeff of the MoE runs")
    ap.add_argument("--iters", type=int, default=12, help="steps per run; the first 2 are warm-up")
    ap.add_argument("--pairs", type=int, default=6, help="A/B pairs (dense, MoE), alternated")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "moe"), help="directory for bench_moe.jsonl")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as work:
        dense_ckpt, moe_ckpt = os.path.join(work, "dense"), os.path.join(work, "moe")
        pretrain([*common_overrides(0), f"checkpoint.save={dense_ckpt}"])  # the dense model's init
        plan, model = upcycle(dense_ckpt, moe_ckpt, args.num_experts, args.topk, granularity=args.granularity)
        moe = [f"model.{k}={v}" for k, v in plan.model_fields(model["ffn_hidden_size"]).items()]
        moe.append(f"model.moe_aux_loss_coeff={args.aux_loss}")
        dense_counts, moe_counts = counts([]), counts(moe)
        active_ratio = moe_counts["active_params"] / dense_counts["active_params"]
        flops_ratio = moe_counts["flops_per_token"] / dense_counts["flops_per_token"]

        print(f"machine: {machine('cpu')}")
        print(f"shape: {SHAPE}; {args.pairs} pairs of runs, {args.iters} steps each (first 2 are warm-up)")
        print(
            f"dense: {dense_counts['params']:,} params; upcycled {plan.family} {args.num_experts} experts of "
            f"{model['moe_ffn_hidden_size']} top {args.topk}: {moe_counts['params']:,} params, "
            f"{moe_counts['active_params']:,} active "
            f"({active_ratio:.4f}x the dense model's), training FLOPs per token {flops_ratio:.4f}x"
        )
        tokens = SHAPE["global_batch_size"] * SHAPE["seq_length"]
        pairs = []
        for i in range(args.pairs):
            dense_s = statistics.median(step_times(dense_ckpt, [], args.iters)[2:])
            moe_s = statistics.median(step_times(moe_ckpt, moe, args.iters)[2:])
            pairs.append((tokens / dense_s, tokens / moe_s))
            print(
                f"pair {i + 1}: dense {tokens / dense_s:.0f} tokens/s ({dense_s * 1e3:.1f} ms/step), MoE "
                f"{tokens / moe_s:.0f} tokens/s ({moe_s * 1e3:.1f} ms/step), ratio {dense_s / moe_s:.3f}"
            )
    ratios = [m / d for d, m in pairs]
    ratio = statistics.median(ratios)
    low, high = median_interval(ratios)
    dense_tps, moe_tps = statistics.median(d for d, _ in pairs), statistics.median(m for _, m in pairs)
    print(f"dense {dense_tps:.0f} tokens/s, MoE {moe_tps:.0f} tokens/s (medians over pairs)")
    print(f"median tokens/s ratio MoE/dense over {len(pairs)} pairs: {ratio:.3f} (< 1: the MoE is slower)")
    print(f"90% bootstrap interval of that median: {low:.3f}-{high:.3f} (pairs {min(ratios):.3f} to {max(ratios):.3f})")
    print(
        f"achieved FLOP/s MoE/dense: {ratio * flops_ratio:.3f} (the tokens/s ratio x {flops_ratio:.3f} FLOPs per "
        "token; 1: routing costs nothing beyond the active FLOPs)"
    )
    os.makedirs(args.out, exist_ok=True)
    record = {
        "machine": machine("cpu"),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "shape": SHAPE,
        "num_experts": args.num_experts,
        "topk": args.topk,
        "granularity": args.granularity,
        "aux_loss": args.aux_loss,
        "iters": args.iters,
        "dense": dense_counts,
        "moe": moe_counts,
        "active_ratio": active_ratio,
        "flops_ratio": flops_ratio,
        "tokens_per_s_pairs": pairs,
        "dense_tokens_per_s": dense_tps,
        "moe_tokens_per_s": moe_tps,
        "ratio": ratio,
        "ratio_interval_90": [low, high],
        "flop_rate_ratio": ratio * flops_ratio,
        "time": time.time(),
    }
    with open(os.path.join(args.out, "bench_moe.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
