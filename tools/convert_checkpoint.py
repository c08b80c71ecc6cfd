#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and megatron-ct, streaming one tensor at a time.

    # HF -> ours: a dist checkpoint the trainer loads at any TP/PP (checked against the target)
    python tools/convert_checkpoint.py hf-to-ct --input llama-2-7b-hf --output ckpt/llama2 --target-tp 2
    torchrun --nproc_per_node 2 pretrain_ct.py --config ckpt/llama2/model.yaml \\
        checkpoint.load=ckpt/llama2 checkpoint.load_weights_only=true --tensor-model-parallel-size 2 ...

    # ours (any checkpoint the trainer saved, any layout) -> HF
    python tools/convert_checkpoint.py ct-to-hf --input runs/ct/iter_0002000 --output llama2-ct-hf \\
        --hf-base llama-2-7b-hf --dtype bf16

Supported architectures: one model family per file in megatron_ct/families (listed below).
Exit status 2 and a one-line message on bad input.
"""

from __future__ import annotations

import json
import logging
import os
import sys

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, check_output_dir, check_output_file, run_cli  # noqa: E402

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def supported() -> str:
    """'LlamaForCausalLM, MistralForCausalLM (llama: ...); ...', from the family specs."""
    from megatron_ct.families import all_families

    return "; ".join(f"{', '.join(f.architecture_names)} ({f.name}: {f.description})" for f in all_families().values())


def build_parser() -> ToolParser:
    p = ToolParser(__file__, __doc__, epilog=f"model families: {supported()}")
    sub = p.add_subparsers(dest="direction", required=True)

    h = sub.add_parser("hf-to-ct", help="Hugging Face model directory -> megatron-ct checkpoint")
    h.add_argument("--input", required=True, help="HF model directory (config.json + safetensors or .bin)")
    h.add_argument("--output", required=True, help="checkpoint root to create (iter_0000000/ + tracker)")
    h.add_argument("--target-tp", type=int, default=1, help="tensor-parallel size to check and pad the vocab for")
    h.add_argument("--target-pp", type=int, default=1, help="pipeline-parallel size to check")
    h.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="vocab padding multiple per TP rank (model.make_vocab_size_divisible_by; default 128)",
    )
    h.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="stored dtype (auto: as in the input)")

    c = sub.add_parser("ct-to-hf", help="megatron-ct checkpoint -> Hugging Face model directory")
    c.add_argument("--input", required=True, help="checkpoint root (follows the tracker) or one iter_* directory")
    c.add_argument("--output", required=True, help="HF model directory to create")
    c.add_argument(
        "--architecture",
        default=None,
        help="an HF architecture of the checkpoint's model family (default: as converted, else from "
        "--hf-base, else the family's first)",
    )
    c.add_argument(
        "--hf-base",
        default=None,
        help="the HF model CT started from: its config.json keys (token ids, ...) and tokenizer are kept",
    )
    c.add_argument("--tokenizer", default=None, help="directory to copy tokenizer files from (overrides --hf-base)")
    c.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="output dtype (auto: as stored)")
    c.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")

    for s in (h, c):
        s.add_argument("--overwrite", action="store_true", help="replace an existing output")
        s.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
        s.add_argument("--summary-json", default=None, help="also write the summary (seconds, bytes, peak RSS) here")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_cli(build_parser(), convert, argv, expected=(OSError,))


def convert(args) -> int:
    check_output_dir(args.output, "--output")
    if args.summary_json:
        check_output_file(args.summary_json, "--summary-json")
    dtype = None if args.dtype == "auto" else args.dtype
    if args.direction == "hf-to-ct":
        from megatron_ct.convert.hf_to_ct import convert_hf_to_ct

        report = convert_hf_to_ct(
            args.input,
            args.output,
            target_tp=args.target_tp,
            target_pp=args.target_pp,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            dtype=dtype,
            overwrite=args.overwrite,
            progress=args.progress,
        )
    else:
        from megatron_ct.convert.ct_to_hf import convert_ct_to_hf

        report = convert_ct_to_hf(
            args.input,
            args.output,
            architecture=args.architecture,
            hf_base=args.hf_base,
            tokenizer=args.tokenizer,
            dtype=dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=args.progress,
        )
    for w in report.warnings:
        print(f"convert_checkpoint.py: warning: {w}", file=sys.stderr)
    print(report.summary())
    if args.direction == "hf-to-ct":
        print(
            f"train from it: pretrain_ct.py --config {os.path.join(args.output, 'model.yaml')} "
            f"checkpoint.load={args.output} checkpoint.load_weights_only=true"
        )
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(vars(report), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
