#!/usr/bin/env python
"""LLaMA-Pro block expansion of a megatron-ct checkpoint.

    # 32 -> 40 layers: one identity block after every 4
    python tools/expand_blocks.py --input ckpt/llama2 --output ckpt/llama2-pro --every 4 --add 1
    torchrun ... pretrain_ct.py --config ckpt/llama2/model.yaml model.num_layers=40 \\
        checkpoint.load=ckpt/llama2-pro checkpoint.load_weights_only=true train.trainable_params=new_blocks

Each new block copies the block before it with its attention output projection and MLP down
projection zeroed, so the expanded model's outputs equal the base model's. The output
records which layers are new, for ``train.trainable_params=new_blocks`` (add ``embeddings``
to train those too). Exit status 2 and a one-line message on bad input.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, check_output_dir, run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(__file__, __doc__)
    parser.add_argument("--input", required=True, help="checkpoint save root or one iter_* directory")
    parser.add_argument("--output", required=True, help="new save root (iter_0000000 + tracker)")
    parser.add_argument("--every", type=int, required=True, help="insert after every this many blocks (M)")
    parser.add_argument("--add", type=int, default=1, help="blocks inserted each time (P)")
    parser.add_argument("--overwrite", action="store_true")
    return run_cli(parser, expand, argv, expected=(OSError,))


def expand(args) -> int:
    check_output_dir(args.output, "--output")  # before torch is imported
    from megatron_ct.expansion.blocks import expand_blocks

    plan = expand_blocks(args.input, args.output, args.every, args.add, overwrite=args.overwrite)
    print(
        f"{len(plan.sources) - len(plan.new_layers)} -> {len(plan.sources)} layers; new layers "
        f"{list(plan.new_layers)}; run with model.num_layers={len(plan.sources)} train.trainable_params=new_blocks"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
