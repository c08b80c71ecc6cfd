#!/usr/bin/env python
"""Sparse upcycling of a dense megatron-ct checkpoint into a mixture of experts.

    # Llama -> Mixtral-style MoE: 8 copies of every MLP, 2 experts per token
    python tools/upcycle_moe.py --input ckpt/llama --output ckpt/llama-8e --num-experts 8 --topk 2
    # fine-grained: 16 experts of a quarter of the MLP each, 4 per token (the dense model's
    # active parameters)
    python tools/upcycle_moe.py --input ckpt/llama --output ckpt/llama-16e --num-experts 16 --topk 4 \\
        --granularity 4
    torchrun ... pretrain_ct.py --config ckpt/llama/model.yaml model.family=mixtral model.num_experts=8 \\
        model.moe_ffn_hidden_size=<ffn> model.moe_router_topk=2 model.moe_aux_loss_coeff=0.01 \\
        checkpoint.load=ckpt/llama-8e checkpoint.load_weights_only=true

Every expert starts as a copy of its layer's MLP and the router is random; the chosen experts'
probabilities are renormalised, so the upcycled model computes the dense model's function (its
first loss is the dense model's) until training separates the experts. ``--granularity G`` cuts
each MLP into G slices along its hidden width: expert e is slice e mod G (its down projection
scaled by G), the router rows are tied within each group of G experts, --num-experts and --topk
are multiples of G, and the model again computes the dense function (with --topk G at the dense
model's active parameters). ``--noise`` perturbs each expert copy (relative to the tensor's
standard deviation) to break their symmetry at once.
llama upcycles to mixtral, qwen3 to qwen3_moe. The line printed at the end gives the overrides.
Exit status 2 and a one-line message on bad input.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, check_output_dir, run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(__file__, __doc__)
    parser.add_argument("--input", required=True, help="dense checkpoint: save root or one iter_* directory")
    parser.add_argument("--output", required=True, help="new save root (iter_0000000 + tracker)")
    parser.add_argument("--num-experts", type=int, required=True, help="experts per layer (E)")
    parser.add_argument("--topk", type=int, default=2, help="experts per token (k)")
    parser.add_argument(
        "--granularity", type=int, default=1, help="slices per MLP: each expert is 1/G of it (default 1: copies)"
    )
    parser.add_argument("--noise", type=float, default=0.0, help="relative noise on each expert copy (0: exact copies)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router weights and the noise")
    parser.add_argument("--overwrite", action="store_true")
    return run_cli(parser, upcycle_command, argv, expected=(OSError,))


def upcycle_command(args) -> int:
    check_output_dir(args.output, "--output")  # before torch is imported
    from megatron_ct.expansion.upcycle import upcycle

    plan, model = upcycle(
        args.input,
        args.output,
        args.num_experts,
        args.topk,
        noise=args.noise,
        seed=args.seed,
        granularity=args.granularity,
        overwrite=args.overwrite,
    )
    print(
        f"{plan.dense} -> {plan.family}: {model['num_layers']} layers x {plan.num_experts} experts of "
        f"{model['moe_ffn_hidden_size']}, top {plan.topk}; run with {plan.overrides(model['ffn_hidden_size'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
