"""Continual pre-training entry point.

    torchrun --nproc_per_node N pretrain_ct.py [--config recipe.yaml] [key=value | --flag value ...]
    srun python pretrain_ct.py --config recipe.yaml          # rank/world from SLURM

With no arguments it trains the embedded default: a tiny LLaMA on a learnable synthetic
stream, a few dozen steps on CPU, loss falling from ~ln(vocab). Keys are the fields of
megatron_ct.config.schema (e.g. ``train.train_iters=10``, ``--tensor-model-parallel-size 2``).

Exit status: 0 finished (or stopped to be resumed: preemption, exit_interval); 2 a bad input
or environment, reported in one line ``error: ...`` on stderr (``--debug`` or
MEGATRON_CT_DEBUG=1 for the traceback); 3 non-finite training (train.nan_policy).
"""

# Imports stay inside main(): megatron-core's checkpoint writer spawns helper processes
# that re-import this file, and they need none of the heavy modules.
import os
import sys


def main(argv: list[str] | None = None) -> int:
    import argparse

    from megatron_ct.cli import quiet_known_warnings

    quiet_known_warnings()

    parser = argparse.ArgumentParser(
        description="megatron-ct continual pre-training",
        epilog="Any other argument overrides a config key: section.key=value, key=value or --key-name value.",
    )
    parser.add_argument(
        "--config",
        help="YAML recipe (sections: model, parallel, train, optim, data, "
        "checkpoint, logging); defaults to the embedded tiny CPU run",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input/environment error")
    args, overrides = parser.parse_known_args(argv)
    debug = args.debug or os.environ.get("MEGATRON_CT_DEBUG") == "1"

    from megatron_ct.config import config_to_dict, load_config
    from megatron_ct.errors import CTError

    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            return 0
        from megatron_ct.training.step import NonFiniteError
        from megatron_ct.training.trainer import run_training

        try:
            outcome = run_training(cfg)
        except NonFiniteError as e:
            if debug:
                raise
            print(f"pretrain_ct.py: {e}", file=sys.stderr)
            return 3
    except CTError as e:
        # Raised on every rank before any collective, so no rank is left waiting.
        if debug:
            raise
        print(f"pretrain_ct.py: error: {e}", file=sys.stderr)
        return 2
    return 0 if outcome.reason in ("finished", "preempted", "exit_interval", "regression") else 1


if __name__ == "__main__":
    sys.exit(main())
