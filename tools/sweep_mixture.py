#!/usr/bin/env python
"""Proxy runs for choosing the domain/general mixture (D-CPT law): one small run per ratio.

    python tools/sweep_mixture.py --config base.yaml --domain zh --general en \\
        --ratios 0.1,0.3,0.5,0.7,0.9 --out runs/mixture_sweep [key=value ...]
    python tools/sweep_mixture.py ... --slurm-array runs/mixture_sweep.sbatch   # then: sbatch it

From a base recipe, writes one pretrain_ct.py config per point into OUT/<point>/config.yaml:
the swept stages' blends give the --domain datasets the share r and the --general datasets
1 - r (each group keeps the recipe's proportions inside it), logs go to the point's directory,
validation sets are evaluated every data.eval_interval steps (--eval-interval) so each run
yields losses at several token counts. Points: every --ratios value, times every --tokens
budget, times every --model size. Then trains them here one after another (--nproc ranks
each; a line per run with time and ETA; finished points are skipped on a rerun), or writes a
SLURM array script (--slurm-array) with one task per point. Fit afterwards with
tools/fit_mixture.py OUT --domain-set ... --general-set ... --out FIT_DIR.

Use a constant or WSD learning rate (optim.lr_decay_style) in proxy runs: under a cosine
schedule an intermediate evaluation is not the loss a run of that length would reach.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's megatron_ct

from megatron_ct.cli import ToolParser, check_output_dir, check_output_file, run_cli  # noqa: E402


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _model(text: str) -> tuple[str, list[str]]:
    label, sep, rest = text.partition(":")
    if not sep or not label or not rest:
        raise argparse.ArgumentTypeError(f"expected LABEL:key=value[,key=value...], got {text!r}")
    return label, [kv.strip() for kv in rest.split(",") if kv.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(
        __file__,
        __doc__,
        epilog="Other arguments override the recipe for every point: section.key=value or --key-name value.",
    )
    parser.add_argument("--config", required=True, help="base recipe (YAML) with datasets, stages and data.valid")
    parser.add_argument("--domain", type=_names, required=True, help="domain dataset name(s), comma-separated")
    parser.add_argument("--general", type=_names, required=True, help="general (replay) dataset name(s)")
    parser.add_argument("--ratios", type=_floats, required=True, help="domain shares, e.g. 0.1,0.3,0.5,0.7")
    parser.add_argument("--out", required=True, help="sweep directory (one sub-directory per point)")
    parser.add_argument("--stage", type=_names, help="stage(s) whose blend is swept (default: every stage)")
    parser.add_argument("--tokens", type=_floats, help="token budget(s) at the mixture per run, e.g. 2e8,4e8")
    parser.add_argument(
        "--model",
        type=_model,
        action="append",
        default=[],
        help="a model size, LABEL:key=value,... (repeat for several; 3+ sizes let the fit extrapolate in N)",
    )
    parser.add_argument("--eval-interval", type=int, help="evaluate every N steps (data.eval_interval)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run (default 1)")
    parser.add_argument("--slurm-array", metavar="FILE", help="write an sbatch array script instead of running")
    parser.add_argument(
        "--sbatch-option", action="append", default=[], help="extra #SBATCH line, e.g. --sbatch-option=--time=4:00:00"
    )
    parser.add_argument("--dry-run", action="store_true", help="write the configs, run nothing")
    parser.add_argument("--force", action="store_true", help="rerun points that hold an earlier run's logs")
    return run_cli(parser, sweep, argv, extra_args=True, exit_codes=_exit_codes)


def _exit_codes() -> dict:
    from megatron_ct.mixture.sweep import RunFailed

    return {RunFailed: 1}  # a proxy run failed: its own log says why


def sweep(args, overrides: list[str]) -> int:
    from megatron_ct.errors import ConfigError
    from megatron_ct.mixture.sweep import SweepSpec, plan_sweep, run_local, slurm_array_script, write_sweep

    if args.nproc < 1:
        raise ConfigError(f"--nproc: expected an integer >= 1, got {args.nproc}")
    check_output_dir(args.out, "--out")
    if args.slurm_array:
        check_output_file(args.slurm_array, "--slurm-array")
    spec = SweepSpec(
        base_config=args.config,
        out=args.out,
        domain=args.domain,
        general=args.general,
        ratios=args.ratios,
        stages=args.stage,
        token_budgets=args.tokens,
        models=args.model,
        eval_interval=args.eval_interval,
        overrides=overrides,
    )
    points = plan_sweep(spec)
    states = write_sweep(spec, points, force=args.force, argv=sys.argv)
    print(f"{len(points)} point(s) in {args.out}: " + ", ".join(p.name for p in points))
    if args.slurm_array:
        from megatron_ct.mixture.report import write_text

        write_text(args.slurm_array, slurm_array_script(points, args.out, args.nproc, args.sbatch_option))
        os.chmod(args.slurm_array, 0o755)
        print(f"wrote {args.slurm_array}: sbatch {args.slurm_array}")
        return 0
    if args.dry_run:
        return 0
    run_local(points, states, args.nproc)
    print(f"all points done; fit with: python tools/fit_mixture.py {args.out} --domain-set SET --general-set SET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
