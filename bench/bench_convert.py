#!/usr/bin/env python
"""Conversion speed and memory: a synthetic LLaMA-2-7B-shaped bf16 checkpoint, HF -> ours -> HF.

Writes a random bf16 ``LlamaForCausalLM`` checkpoint (LLaMA-2-7B shapes: hidden 4096, 32 heads,
FFN 11008, vocab 32000, untied) shard by shard into a work directory, then runs
``tools/convert_checkpoint.py hf-to-ct --target-tp 2`` and ``ct-to-hf`` each in a fresh
process, and reports seconds, MB/s and the converter process's peak RSS next to the size
of the largest tensor and of the whole model. A fresh process that only imports the
converter is measured too: that baseline is what torch and megatron-core cost before any
tensor is touched.

The full model is ~13.5 GB and needs ~3x that on disk (input, ours, output). ``--layers N``
keeps the per-layer shapes and the vocabulary but builds N layers (what was run is printed).
Not a timed test: run it by hand, e.g. ``python bench/bench_convert.py --layers 4``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_ct.convert.hf_files import SafetensorsShardWriter, parse_size  # noqa: E402


def llama_config(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def hf_tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_synthetic_hf(directory: str, cfg: dict, shard_size: str) -> tuple[int, int]:
    """Random bf16 weights, one tensor in memory at a time. Returns (total, largest) bytes."""
    os.makedirs(directory, exist_ok=True)
    shapes = hf_tensor_shapes(cfg)
    writer = SafetensorsShardWriter(directory, [(n, s, torch.bfloat16) for n, s in shapes], parse_size(shard_size))
    gen = torch.Generator().manual_seed(0)
    largest = 0
    for name, shape in shapes:
        t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        largest = max(largest, t.numel() * 2)
        writer.write(name, t)
        del t
    writer.close()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return writer.total_bytes, largest


def run_cli(args: list[str], summary: str) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *args, "--summary-json", summary]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed: {' '.join(cmd)}")
    with open(summary) as f:
        return json.load(f)


def import_baseline_rss() -> int:
    code = (
        "import megatron_ct.convert.hf_to_ct, megatron_ct.convert.ct_to_hf, megatron.core.dist_checkpointing; "
        "from megatron_ct.convert.progress import peak_rss_bytes; print(peak_rss_bytes())"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="transformer layers (LLaMA-2-7B: 32)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--target-tp", type=int, default=2)
    p.add_argument("--shard-size", default="5GB", help="safetensors shard size of the input and output")
    p.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()

    cfg = llama_config(args.layers, args.hidden, args.heads, args.kv_heads, args.ffn, args.vocab)
    model_bytes = sum(2 * torch.Size(s).numel() for _, s in hf_tensor_shapes(cfg))
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 3.2 * model_bytes:
        raise SystemExit(
            f"{work}: {free / 1e9:.1f} GB free, need ~{3.2 * model_bytes / 1e9:.1f} GB for input, ours and "
            f"output; use --layers to scale down or --workdir elsewhere"
        )
    print(
        f"model: LLaMA-2-7B shapes, {args.layers} layers (7B: 32), hidden {args.hidden}, FFN {args.ffn}, "
        f"vocab {args.vocab}, bf16, untied -> {model_bytes / 1e9:.2f} GB; work dir {work}",
        flush=True,
    )
    try:
        t0 = time.perf_counter()
        total, largest = write_synthetic_hf(os.path.join(work, "hf"), cfg, args.shard_size)
        print(f"wrote the synthetic HF checkpoint in {time.perf_counter() - t0:.1f}s", flush=True)
        to_ct = run_cli(
            [
                "hf-to-ct",
                "--input",
                os.path.join(work, "hf"),
                "--output",
                os.path.join(work, "ct"),
                "--target-tp",
                str(args.target_tp),
            ],
            os.path.join(work, "to_ct.json"),
        )
        to_hf = run_cli(
            [
                "ct-to-hf",
                "--input",
                os.path.join(work, "ct"),
                "--output",
                os.path.join(work, "hf_back"),
                "--max-shard-size",
                args.shard_size,
            ],
            os.path.join(work, "to_hf.json"),
        )
        baseline = import_baseline_rss()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nmodel {total / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB; import-only process peak RSS "
        f"{baseline / 1e6:.0f} MB"
    )
    print(f"{'direction':<22}{'seconds':>9}{'MB/s':>9}{'peak RSS MB':>13}{'RSS - import MB':>17}")
    for name, r in ((f"HF -> ours (TP{args.target_tp})", to_ct), ("ours -> HF", to_hf)):
        mb = r["bytes_written"] / 1e6
        print(
            f"{name:<22}{r['seconds']:>9.1f}{mb / r['seconds']:>9.0f}{r['peak_rss_bytes'] / 1e6:>13.0f}"
            f"{(r['peak_rss_bytes'] - baseline) / 1e6:>17.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
