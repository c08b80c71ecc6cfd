"""Training throughput of pretrain_ct.py against a plain Hugging Face baseline, alternated.

    python bench/bench_train.py                 # GPU if visible: LLaMA-7B-width slice, bf16
    python bench/bench_train.py --device cpu    # the CPU shape (what CI machines can run)

Runs ours and the baseline alternately (A B A B ..., ``--pairs`` pairs, default 3), each in a
fresh process on the same machine, and reports per run the median step time after warm-up;
then the median over pairs of the ratio ours/baseline (< 1: ours is faster) with tokens/s,
TFLOP/s per device and MFU. Ours is ``pretrain_ct.py`` under torchrun on the synthetic stream
(step times from its metrics.jsonl, which exclude evaluation and checkpoint time); the
baseline is ``transformers``' LlamaForCausalLM with the same shape, batch, micro-batching and
precision, trained by torch.optim.AdamW with gradient clipping (eager PyTorch, SDPA
attention). FLOPs are counted the same way for both (megatron_ct.training.flops). Results are
printed and appended as JSONL to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_ct.parallel.launch import child_env, torchrun_command  # noqa: E402

SHAPES = {
    # A LLaMA-7B-width slice: full width and sequence, 4 of the 32 layers.
    "gpu": dict(
        num_layers=4,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=32,
        ffn_hidden_size=11008,
        vocab_size=32000,
        seq_length=4096,
        micro_batch_size=1,
        global_batch_size=8,
        precision="bf16",
    ),
    "cpu": dict(
        num_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=704,
        # A multiple of 128, as real vocabularies are (LLaMA 32000, Llama-3 128256, Qwen
        # 151936, SmolLM2 49152), so megatron-core pads nothing: at 8000 (the rows before
        # 2026-12-07, `--vocab-size 8000`) ours computes 8064 logits per token to HF's 8000.
        vocab_size=8192,
        seq_length=256,
        micro_batch_size=2,
        global_batch_size=8,
        precision="fp32",
    ),
}


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        return f"{name} x{torch.cuda.device_count()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = "unknown CPU"
    try:
        cpu = next(li.split(":", 1)[1].strip() for li in open("/proc/cpuinfo") if li.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def shape_overrides(shape: dict) -> list[str]:
    """pretrain_ct.py config overrides for a shape of :data:`SHAPES`."""
    return [
        f"model.num_layers={shape['num_layers']}",
        f"model.hidden_size={shape['hidden_size']}",
        f"model.num_attention_heads={shape['num_attention_heads']}",
        f"model.num_query_groups={shape['num_query_groups']}",
        f"model.ffn_hidden_size={shape['ffn_hidden_size']}",
        f"model.vocab_size={shape['vocab_size']}",
        f"model.max_position_embeddings={shape['seq_length']}",
        f"data.seq_length={shape['seq_length']}",
        f"train.micro_batch_size={shape['micro_batch_size']}",
        f"train.global_batch_size={shape['global_batch_size']}",
        f"train.precision={shape['precision']}",
    ]


def run_ours(shape: dict, device: str, nproc: int, iters: int, extra: list[str]) -> list[float]:
    """Step times (s) of pretrain_ct.py, from its metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            *shape_overrides(shape),
            f"train.train_iters={iters}",
            f"parallel.device={device}",
            f"logging.log_dir={tmp}",
            *extra,
        ]
        # One process runs as plain `python pretrain_ct.py`, as the baseline does (no torchrun
        # agent polling beside it on a small machine); more go through torchrun.
        cmd = torchrun_command(nproc, REPO / "pretrain_ct.py", overrides, plain_for_one=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        if proc.returncode != 0:
            sys.exit(f"pretrain_ct.py failed:\n{proc.stderr[-4000:]}")
        return [json.loads(li)["step_time_s"] for li in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]


def hf_baseline(shape: dict, device: str, iters: int) -> list[float]:
    """Step times (s) of eager HF LlamaForCausalLM + AdamW on the same global batch."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_ct.dtypes import DTYPES

    dtype = DTYPES[shape["precision"]]
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["ffn_hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_query_groups"],
        max_position_embeddings=shape["seq_length"],
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mbs, gbs, s = shape["micro_batch_size"], shape["global_batch_size"], shape["seq_length"]
    batch = torch.randint(0, shape["vocab_size"], (gbs, s + 1), device=device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for i in range(0, gbs, mbs):  # same micro-batching as ours, gradient accumulation
            chunk = batch[i : i + mbs]
            out = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1])
            (out.loss * mbs / gbs).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def run_baseline(shape: dict, device: str, iters: int) -> list[float]:
    """The baseline in a fresh process, as ours runs (same thread settings, no warm caches)."""
    cmd = [
        sys.executable,
        __file__,
        "--baseline-worker",
        json.dumps({"shape": shape, "device": device, "iters": iters}),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if proc.returncode != 0:
        sys.exit(f"baseline failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_interval(ratios: list[float], level: float = 0.9, draws: int = 2000) -> tuple[float, float]:
    """Bootstrap interval of the median pair ratio (seeded): how far the printed median could
    move on a re-run of as many pairs on a machine as noisy as this one."""
    import random

    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    tail = (1.0 - level) / 2
    return medians[int(tail * draws)], medians[min(int((1.0 - tail) * draws), draws - 1)]


def main() -> None:
    import torch

    from megatron_ct.config import load_config
    from megatron_ct.families import family_of
    from megatron_ct.training.flops import peak_tflops_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--nproc", type=int, default=1, help="processes for pretrain_ct.py (DP unless --extra sets TP/PP)")
    ap.add_argument("--iters", type=int, default=12, help="steps per run; the first 2 are warm-up")
    ap.add_argument("--pairs", type=int, default=3, help="A/B pairs (ours, baseline), alternated")
    ap.add_argument("--extra", nargs="*", default=[], help="more pretrain_ct.py overrides, e.g. --sequence-parallel")
    ap.add_argument("--vocab-size", type=int, help="override the shape's vocabulary (CPU rows before 2026-12-07: 8000)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_train"), help="directory for bench_train.jsonl")
    ap.add_argument("--baseline-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_worker:
        spec = json.loads(args.baseline_worker)
        print(json.dumps(hf_baseline(spec["shape"], spec["device"], spec["iters"])))
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shape = dict(SHAPES["gpu" if device == "cuda" else "cpu"])
    if args.vocab_size is not None:
        shape["vocab_size"] = args.vocab_size
    names = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size")
    cfg = load_config(None, [f"model.{k}={shape[k]}" for k in names])
    padded = ((shape["vocab_size"] + 127) // 128) * 128
    tokens = shape["global_batch_size"] * shape["seq_length"]
    flops_step = tokens * family_of(cfg.model).flops_per_token(cfg.model, shape["seq_length"], padded)
    peak = peak_tflops_for(torch.cuda.get_device_name()) if device == "cuda" else None

    print(f"machine: {machine(device)}")
    print(f"shape: {shape}; {args.pairs} pairs of runs, {args.iters} steps each (first 2 are warm-up)")
    pairs = []
    for i in range(args.pairs):
        ours = statistics.median(run_ours(shape, device, args.nproc, args.iters, args.extra)[2:])
        base = statistics.median(run_baseline(shape, device, args.iters)[2:])
        pairs.append((ours, base))
        print(
            f"pair {i + 1}: ours {ours * 1e3:.1f} ms/step, baseline {base * 1e3:.1f} ms/step, ratio {ours / base:.3f}"
        )
    ratio = statistics.median(o / b for o, b in pairs)
    rows = []
    for name, step_s, ndev in (
        ("megatron-ct (pretrain_ct.py)", statistics.median(o for o, _ in pairs), args.nproc),
        ("HF eager baseline", statistics.median(b for _, b in pairs), 1),
    ):
        tflops = flops_step / step_s / ndev / 1e12
        rows.append(
            {
                "impl": name,
                "devices": ndev,
                "step_s": step_s,
                "tokens_per_s": tokens / step_s,
                "tflops_per_device": tflops,
                "mfu": tflops / peak if peak else None,
            }
        )
    print(f"{'impl':30} {'dev':>3} {'step s':>8} {'tokens/s':>10} {'TFLOP/s/dev':>12} {'MFU':>6}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"{r['impl']:30} {r['devices']:>3} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
            f"{r['tflops_per_device']:>12.2f} {mfu:>6}"
        )
    print(f"median step-time ratio ours/baseline over {len(pairs)} pairs: {ratio:.3f} (< 1: ours faster)")
    ratios = [o / b for o, b in pairs]
    low, high = median_interval(ratios)
    print(f"90% bootstrap interval of that median: {low:.3f}-{high:.3f} (pairs {min(ratios):.3f} to {max(ratios):.3f})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_train.jsonl"), "a") as f:
        record = {
            "machine": machine(device),
            "shape": shape,
            "pairs": pairs,
            "ratio": ratio,
            "ratio_interval_90": [low, high],
            "rows": rows,
        }
        f.write(json.dumps({**record, "time": time.time()}) + "\n")


if __name__ == "__main__":
    main()
