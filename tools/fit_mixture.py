#!/usr/bin/env python
"""Fit the D-CPT law to proxy runs and recommend the domain/general mixture.

    python tools/fit_mixture.py runs/mixture_sweep --domain-set zh --general-set general \\
        --out runs/mixture_fit --target-tokens 2e10 --max-general-regression 0.02 --emit-stage zh_ct
    python tools/fit_mixture.py --observations points.jsonl --domain-set zh --general-set en --out fit/

Reads proxy runs (run directories or a sweep directory from tools/sweep_mixture.py: the
recorded config.yaml gives the domain ratio r, model size N and tokens per step; eval.jsonl
gives each validation set's loss at several token counts D) and/or --observations, JSON
lines {"ratio": r, "tokens": D, "params": N, "set": name, "loss": x} with r the domain share.

Fits, per set, L(N, D, r) = E + A/N^alpha + B*r^eta/D^beta + C/(r + eps)^gamma (arXiv
2406.01375; r is the set's own share: the domain share for --domain-set, 1 - it for
--general-set; Huber loss on log loss, L-BFGS from several starts; with one model size A/N^alpha
folds into E). Each run's last evaluation is first held out and predicted by a fit without it.
Then predicts both losses over r at --target-tokens/--target-params and recommends, within
the observed ratios (--ratio-range), the ratio with the lowest domain loss whose general loss
rises at most --max-general-regression over the general loss at r = 0 (or over
--general-base-loss), or the one minimising a weighted sum (--objective weighted
--domain-weight w). Also the tokens after which the domain loss gains
less than --min-gain per doubling (or per --gain-window tokens).

Writes OUT/fit.json and OUT/fit.png; --emit-stage NAME prints a curriculum stage (YAML) with
the recommended blend for data.stages.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's megatron_ct

from megatron_ct.cli import ToolParser, check_output_dir, run_cli  # noqa: E402


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(__file__, __doc__)
    parser.add_argument("runs", nargs="*", help="proxy-run directories or sweep directories")
    parser.add_argument("--observations", metavar="FILE", help="JSON lines of ratio, tokens, params, set, loss")
    parser.add_argument("--domain-set", required=True, help="validation set measuring the domain")
    parser.add_argument("--general-set", required=True, help="validation set measuring general ability")
    parser.add_argument("--out", required=True, help="directory for fit.json and fit.png")
    parser.add_argument("--target-tokens", type=float, help="token budget to predict for (default: largest observed)")
    parser.add_argument("--target-params", type=float, help="model size to predict for (needs runs at 3+ sizes)")
    parser.add_argument("--objective", choices=("constrained", "weighted"), default="constrained")
    parser.add_argument(
        "--max-general-regression", type=float, default=0.02, help="largest relative general-loss rise (0.02 = 2%%)"
    )
    parser.add_argument("--general-base-loss", type=float, help="general loss to measure the rise against")
    parser.add_argument("--domain-weight", type=float, default=0.5, help="weighted objective: weight of domain loss")
    parser.add_argument("--min-gain", type=float, default=0.01, help="stop_tokens: domain-loss gain in nats")
    parser.add_argument("--gain-window", type=float, help="stop_tokens: per this many tokens (default: per doubling)")
    parser.add_argument(
        "--ratio-range", type=_range, help="LO,HI: domain shares to choose from (default: the observed range)"
    )
    parser.add_argument("--eps", type=float, help="fix the law's eps (then 3 ratios suffice instead of 4)")
    parser.add_argument("--holdout", choices=("last", "none"), default="last", help="held-out check (default last)")
    parser.add_argument("--domain-data", type=_names, help="domain dataset name(s), for runs not made by the sweep")
    parser.add_argument("--general-data", type=_names, help="general dataset name(s), for --emit-stage's blend")
    parser.add_argument("--stage", type=_names, help="swept stage(s), for runs not made by the sweep")
    parser.add_argument("--emit-stage", nargs="?", const="mixture", metavar="NAME", help="print a YAML stage block")
    parser.add_argument("--no-plot", action="store_true", help="skip fit.png")
    return run_cli(parser, _run, argv)


def _check_args(args) -> None:
    from megatron_ct.errors import ConfigError

    checks = [
        ("--target-tokens", args.target_tokens, lambda v: v > 0, "a number > 0"),
        ("--target-params", args.target_params, lambda v: v > 0, "a number > 0"),
        ("--max-general-regression", args.max_general_regression, lambda v: v >= 0, "a number >= 0"),
        ("--general-base-loss", args.general_base_loss, lambda v: v > 0, "a loss > 0"),
        ("--domain-weight", args.domain_weight, lambda v: 0 <= v <= 1, "a weight in [0, 1]"),
        ("--min-gain", args.min_gain, lambda v: v > 0, "a number > 0"),
        ("--gain-window", args.gain_window, lambda v: v > 0, "a number of tokens > 0"),
        ("--eps", args.eps, lambda v: v > 0, "a number > 0"),
    ]
    for flag, value, ok, expected in checks:
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"{flag}: expected {expected}, got {value:g}")
    if not args.runs and not args.observations:
        raise ConfigError("no input: give proxy-run or sweep directories, or --observations FILE")
    check_output_dir(args.out, "--out")
    import importlib.util

    from megatron_ct.errors import CTError

    for module, why in (("scipy", "the fit"), ("matplotlib", "fit.png (or --no-plot)")):
        if (module != "matplotlib" or not args.no_plot) and importlib.util.find_spec(module) is None:
            raise CTError(f"{why} needs {module}: pip install -e .[mixture]")


def _run(args) -> int:
    from megatron_ct.mixture.observations import collect
    from megatron_ct.mixture.report import FitOptions, fit_mixture, plot_fit, stage_block, write_json

    _check_args(args)
    obs, runs = collect(args.runs, args.observations, args.domain_data, args.stage)
    opts = FitOptions(
        domain_set=args.domain_set,
        general_set=args.general_set,
        target_tokens=args.target_tokens,
        target_params=args.target_params,
        objective=args.objective,
        max_general_regression=args.max_general_regression,
        general_base_loss=args.general_base_loss,
        domain_weight=args.domain_weight,
        min_gain=args.min_gain,
        gain_window=args.gain_window,
        eps=args.eps,
        ratio_range=args.ratio_range,
        holdout=args.holdout,
        domain_data=args.domain_data,
        general_data=args.general_data,
    )
    sources = [*args.runs, *([args.observations] if args.observations else [])]
    report, laws = fit_mixture(obs, opts, runs, sources)
    block = stage_block(report, args.emit_stage) if args.emit_stage else None  # refuses before writing
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "fit.json"), report)
    if not args.no_plot:
        plot_fit(report, laws, obs, os.path.join(args.out, "fit.png"))
    out = sys.stderr if block else sys.stdout  # stdout carries only the stage block when asked
    for name, entry in report["sets"].items():
        held = entry["heldout"]
        held_text = (
            f"held-out error {held['mean_rel_error']:.2%} (max {held['max_rel_error']:.2%}, {held['points']} points)"
            if held["points"]
            else "no held-out points"
        )
        print(
            f"{entry['role']} set {name!r}: {entry['points']} points, fit error "
            f"{entry['fit']['mean_rel_error']:.2%}, {held_text}",
            file=out,
        )
    rec = report["recommendation"]
    target = report["target"]
    if rec["ratio"] is None:
        print(f"no recommendation: {rec['note']}", file=out)
    else:
        print(
            f"recommended domain ratio {rec['ratio']:g} at {target['tokens']:.4g} tokens: domain loss "
            f"{rec['domain_loss']:.4f}, general loss {rec['general_loss']:.4f} "
            f"({rec['general_regression']:+.2%} vs {rec['general_reference']:.4f})",
            file=out,
        )
        stop = report["stop_tokens"]
        if stop and stop["tokens"] is not None:
            far = " (over 1000x the target: an extrapolation)" if stop["tokens"] > 1000 * target["tokens"] else ""
            print(
                f"domain loss gains < {stop['min_gain']:g} nats per {stop['per']} after {stop['tokens']:.4g} "
                f"tokens{far}",
                file=out,
            )
    print(f"wrote {os.path.join(args.out, 'fit.json')}" + ("" if args.no_plot else " and fit.png"), file=out)
    if block:
        print(block, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
