#!/usr/bin/env python
"""Weighted sums of megatron-ct checkpoints: base/CT interpolation, averaging, alpha sweeps.

    # interpolate: 0.7 x base + 0.3 x CT (weights add up to 1)
    python tools/merge_checkpoints.py --inputs ckpt/base runs/ct --weights 0.7 0.3 --output ckpt/merged
    # average the last checkpoints of a run (equal weights when --weights is omitted)
    python tools/merge_checkpoints.py --inputs runs/ct/iter_0009000 runs/ct/iter_0009500 runs/ct/iter_0010000 \\
        --output ckpt/avg
    # interpolate straight into a Hugging Face model directory
    python tools/merge_checkpoints.py --inputs ckpt/base runs/ct --weights 0.5 0.5 --output merged-hf --hf \\
        --hf-base llama-2-7b-hf --dtype bf16
    # sweep: evaluate alphas on the recipe's validation sets, print/plot target gain vs general loss
    python tools/merge_checkpoints.py --base ckpt/base --ct runs/ct --sweep-alphas 0 0.25 0.5 0.75 1 \\
        --recipe runs/ct/curriculum.yaml --target-set zh --general-set en --output runs/sweep \\
        [--nproc-per-node 2] [-- parallel.tensor_model_parallel_size=2 ...]

Inputs are save roots (their latest iteration) or iter_* directories, saved at any TP/PP.
Our output is a weights-only checkpoint (iteration 0): train or evaluate it with
``checkpoint.load=OUT checkpoint.load_weights_only=true`` at any TP/PP. With an expanded
vocabulary (a base and its CT checkpoint after tools/expand_vocab.py), old token rows
interpolate and the appended rows come from the CT side. Everything else must match
(layers, hidden size, ...). See megatron_ct/checkpoint/merge.py for the exact rules.

Sweep mode writes, per alpha, OUT/alpha_<a>/checkpoint (removed after evaluation unless
--keep-checkpoints) and OUT/alpha_<a>/eval/ (the trainer's eval.jsonl and log), then
OUT/sweep.jsonl and OUT/sweep.png. Words after ``--`` are passed to pretrain_ct.py.

Exit status 0 on success; 2 and a one-line message on bad input (--debug for a traceback).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, check_output_dir, run_cli  # noqa: E402

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def build_parser() -> ToolParser:
    p = ToolParser(__file__, __doc__)
    p.add_argument("--inputs", nargs="+", help="checkpoints to merge (save roots or iter_* directories)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per input, adding up to 1 (default: equal)")
    p.add_argument("--output", required=True, help="new save root, HF directory (--hf) or sweep work directory")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face model directory instead of our checkpoint")
    p.add_argument("--hf-base", default=None, help="with --hf: the HF model CT started from (config keys, tokenizer)")
    p.add_argument("--tokenizer", default=None, help="with --hf: directory to copy tokenizer files from")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="output dtype (auto: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    s = p.add_argument_group("sweep")
    s.add_argument("--sweep-alphas", nargs="+", type=float, help="alphas to evaluate: (1 - a) x base + a x CT")
    s.add_argument("--base", help="sweep: the base checkpoint (or the first of two --inputs)")
    s.add_argument("--ct", help="sweep: the CT checkpoint (or the second of two --inputs)")
    s.add_argument("--recipe", help="sweep: trainer recipe whose data.valid sets are evaluated")
    s.add_argument("--target-set", help="sweep: validation set CT aims at (gain = its improvement)")
    s.add_argument("--general-set", help="sweep: validation set of what the base knew (its change = forgetting)")
    s.add_argument("--nproc-per-node", type=int, default=1, help="sweep: trainer processes per evaluation")
    s.add_argument("--keep-checkpoints", action="store_true", help="sweep: keep every merged checkpoint")
    return p


def _sweep(args, trainer_overrides: list[str]) -> None:
    from megatron_ct.checkpoint.merge_sweep import TrainerEvaluation, sweep
    from megatron_ct.errors import ConfigError

    if args.base or args.ct:
        if not (args.base and args.ct) or args.inputs:
            raise ConfigError("sweep: expected --base and --ct (or two --inputs), not both")
        base, ct = args.base, args.ct
    elif args.inputs and len(args.inputs) == 2:
        base, ct = args.inputs
    else:
        raise ConfigError("sweep: expected --base and --ct (or two --inputs: base, CT)")
    if args.weights or args.hf:
        raise ConfigError("sweep: --weights and --hf do not apply (weights are 1 - alpha, alpha)")
    for flag in ("recipe", "target_set", "general_set"):
        if not getattr(args, flag):
            raise ConfigError(f"sweep: --{flag.replace('_', '-')} is required")
    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node {args.nproc_per_node}: expected >= 1")
    evaluation = TrainerEvaluation(args.recipe, trainer_overrides, args.nproc_per_node)
    sets = evaluation.valid_sets()
    for flag, name in (("--target-set", args.target_set), ("--general-set", args.general_set)):
        if name not in sets:
            raise ConfigError(f"{flag} {name}: not a data.valid set of {args.recipe} ({', '.join(sets) or 'none'})")
    sweep(
        base,
        ct,
        args.sweep_alphas,
        args.output,
        evaluate=evaluation,
        target_set=args.target_set,
        general_set=args.general_set,
        dtype=None if args.dtype == "auto" else args.dtype,
        keep_checkpoints=args.keep_checkpoints,
        overwrite=args.overwrite,
        progress=args.progress,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trainer_overrides = argv[:cut], argv[cut + 1 :]
    return run_cli(build_parser(), lambda args: merge(args, trainer_overrides), argv, expected=(FileNotFoundError,))


def merge(args, trainer_overrides: list[str]) -> int:
    from megatron_ct.errors import ConfigError

    check_output_dir(args.output, "--output")
    if args.sweep_alphas is not None:
        _sweep(args, trainer_overrides)
        return 0
    if trainer_overrides:
        raise ConfigError("words after -- are trainer overrides, for --sweep-alphas only")
    if not args.inputs:
        raise ConfigError("--inputs: expected the checkpoints to merge")
    from megatron_ct.checkpoint.merge import merge_checkpoints

    report = merge_checkpoints(
        args.inputs,
        args.weights,
        args.output,
        hf=args.hf,
        dtype=None if args.dtype == "auto" else args.dtype,
        hf_base=args.hf_base,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    for w in report.warnings:
        print(f"merge_checkpoints.py: warning: {w}", file=sys.stderr)
    print(report.summary())
    if not args.hf:
        print(
            f"train or evaluate it: pretrain_ct.py ... model.vocab_size={report.vocab} "
            f"checkpoint.load={args.output} checkpoint.load_weights_only=true"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
