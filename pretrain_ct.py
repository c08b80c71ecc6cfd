"""Continual pre-training entry point.

    torchrun --nproc_per_node N pretrain_ct.py [--config recipe.yaml] [key=value | --flag value ...]
    srun python pretrain_ct.py --config recipe.yaml          # rank/world from SLURM

With no arguments it trains the embedded default: a tiny LLaMA on a learnable synthetic
stream, a few dozen steps on CPU, loss falling from ~ln(vocab). Keys are the fields of
megatron_ct.config.schema (e.g. ``train.train_iters=10``, ``--tensor-model-parallel-size 2``).

Exit status: 0 finished (or stopped to be resumed: preemption, exit_interval); 2 a bad input
or environment, reported in one line ``error: ...`` on stderr (``--debug`` or
MEGATRON_CT_DEBUG=1 for the traceback); 3 non-finite training (train.nan_policy); 4 a hang
(a training step did not finish within train.hang_timeout_s; stacks in checkpoint.save/hang).
With MEGATRON_CT_STATUS_DIR set (the sbatch script does), a status other than 0 is also left
there as ``rank<R>``: srun's own status is not the trainers'.
"""

# Imports stay inside main(): megatron-core's checkpoint writer spawns helper processes
# that re-import this file, and they need none of the heavy modules.
import sys


def main(argv: list[str] | None = None) -> int:
    from megatron_ct.cli import ToolParser, record_exit_status, run_cli

    parser = ToolParser(
        "pretrain_ct.py",
        "megatron-ct continual pre-training",
        epilog="Any other argument overrides a config key: section.key=value, key=value or --key-name value.",
    )
    parser.add_argument(
        "--config",
        help="YAML recipe (sections: model, parallel, train, optim, data, "
        "checkpoint, logging); defaults to the embedded tiny CPU run",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    status = run_cli(parser, train, argv, extra_args=True, exit_codes=_exit_codes)
    if status:
        record_exit_status(status)  # for the sbatch script: srun's status is not the trainers'
    return status


def train(args, overrides: list[str]) -> int:
    # A CTError is raised on every rank before any collective, so no rank is left waiting.
    from megatron_ct.config import config_to_dict, load_config

    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    if cfg.train.hang_detection:
        from megatron_ct.training.watchdog import trace_collectives

        # Before megatron-core is imported: it binds some collectives to its own names then.
        trace_collectives()
    from megatron_ct.training.trainer import run_training

    outcome = run_training(cfg)
    return 0 if outcome.reason in ("finished", "preempted", "exit_interval", "regression") else 1


def _exit_codes() -> dict:
    from megatron_ct.training.step import NonFiniteError

    return {NonFiniteError: 3}


if __name__ == "__main__":
    sys.exit(main())
