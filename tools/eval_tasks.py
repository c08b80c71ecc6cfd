#!/usr/bin/env python
"""Downstream tasks on a checkpoint, or on every checkpoint of a run: did the CT work, what did it cost?

    # shipped local tasks (megatron_ct/evaluation/tasks/) and your own task YAMLs
    python tools/eval_tasks.py --checkpoint runs/ct --tasks zh_sentiment en_continuation my_task.yaml \\
        --output downstream.jsonl
    # the base model before CT (a HF directory with its own tokenizer), then every checkpoint of the run
    python tools/eval_tasks.py --checkpoint base_hf --label base --tasks zh_sentiment --output ds.jsonl
    python tools/eval_tasks.py --run runs/ct --tasks zh_sentiment --output ds.jsonl --append --plot ds.png
    # lm-evaluation-harness tasks on local data, at PP2 on two processes
    torchrun --nproc_per_node 2 tools/eval_tasks.py --checkpoint runs/ct --pipeline-model-parallel-size 2 \\
        --lm-eval-tasks my_lm_eval_task --include-path tasks/ --log-samples samples/ --output ds.jsonl

--checkpoint is a Hugging Face directory or one of our checkpoints (a save root or an iter_*
directory, any saved layout), run at the TP/PP given here by every launched process; --run
takes every complete iter_* of a save root in order (one model build, weights reloaded). The
tokenizer defaults to the one stored with the checkpoint. One JSON line per number:
{"task", "metric", "value", "stderr", "template", "n", "suite", "iteration", "stage", "label",
"checkpoint"}; a local task reports each template and their "mean" and "spread". --plot draws
each task's accuracy across iterations with stage boundaries and base lines (from --output's
records, earlier ones included with --append).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, add_model_flags, check_output_file, int_at_least, run_cli  # noqa: E402


def build_parser() -> ToolParser:
    p = ToolParser(__file__, __doc__)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="DIR", help="HF model directory or megatron-ct checkpoint")
    which.add_argument("--run", metavar="ROOT", help="a save root: every complete iter_* checkpoint, in order")
    p.add_argument("--tasks", nargs="+", default=[], metavar="TASK", help="shipped task names or task YAML files")
    p.add_argument("--lm-eval-tasks", nargs="+", default=[], metavar="NAME", help="lm-evaluation-harness tasks")
    p.add_argument("--include-path", metavar="DIR", help="lm-eval task YAML directory (local data)")
    p.add_argument("--num-fewshot", type=int_at_least(0), help="lm-eval tasks: few-shot examples")
    p.add_argument("--limit", type=int_at_least(1), help="lm-eval tasks: items per task at most")
    p.add_argument("--log-samples", metavar="DIR", help="lm-eval tasks: per-item samples as JSONL here")
    p.add_argument("--output", required=True, metavar="FILE", help="JSON lines of results")
    p.add_argument("--append", action="store_true", help="add to --output instead of replacing it")
    p.add_argument("--label", help="label of these records (e.g. base)")
    p.add_argument("--plot", metavar="PNG", help="draw every task of --output across iterations")
    p.add_argument("--seq-length", type=int_at_least(1), default=2048, help="tokens per input at most (2048)")
    add_model_flags(p, micro_batch_size=4, rows="sequences")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv, expected=(ValueError, FileNotFoundError))


def run_checkpoints(root: str) -> list[str]:
    """Every complete ``iter_*`` directory of a save root, by iteration."""
    from megatron_ct.checkpoint.root import iter_dir, saved_iterations
    from megatron_ct.errors import CheckpointError

    found = saved_iterations(root) if os.path.isdir(root) else []
    if not found:
        raise CheckpointError(f"--run {root}: no complete iter_* checkpoint; expected a save root of pretrain_ct.py")
    return [iter_dir(root, it) for it in found]


def where(meta, checkpoint: str, label: str | None) -> dict:
    """The fields that say which model a record is of."""
    stage = (meta.state or {}).get("stage") if meta is not None else None
    return {
        "iteration": meta.iteration if meta is not None else None,
        "stage": stage.get("name") if stage else None,
        "stage_start": stage.get("start_iter") if stage else None,
        "label": label,
        "checkpoint": os.path.abspath(checkpoint),
    }


def _lm_eval_spec(args):
    """The lm-eval tasks to run (importing lm-eval only when asked for)."""
    try:
        from megatron_ct.evaluation.lm_eval_model import LmEvalTasks
    except ImportError:
        from megatron_ct.errors import ConfigError

        raise ConfigError(
            "--lm-eval-tasks: lm-evaluation-harness is not installed; expected pip install lm_eval"
        ) from None
    return LmEvalTasks(
        names=args.lm_eval_tasks,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        samples_dir=args.log_samples,
    )


def run(args) -> int:
    from megatron_ct.evaluation.tasks import load_tasks

    # The arguments and task files first: their errors come before torch is imported.
    check_output_file(args.output, "--output")
    if args.plot:
        check_output_file(args.plot, "--plot")
    if not args.tasks and not args.lm_eval_tasks:
        from megatron_ct.errors import ConfigError

        raise ConfigError("--tasks / --lm-eval-tasks: expected at least one task")
    tasks = load_tasks(args.tasks)  # a bad task file fails here, before any model loads

    from megatron_ct.checkpoint.manager import load_weights
    from megatron_ct.checkpoint.meta import read_meta
    from megatron_ct.evaluation.downstream import local_records
    from megatron_ct.evaluation.lm import TextScorer
    from megatron_ct.evaluation.session import EvalOptions, open_model

    spec = _lm_eval_spec(args) if args.lm_eval_tasks else None
    opts = EvalOptions.from_args(args, progress=False)
    checkpoints = run_checkpoints(args.run) if args.run else [args.checkpoint]
    records: list[dict] = []
    with open_model(checkpoints[0], args.tokenizer, opts) as session:
        for i, checkpoint in enumerate(checkpoints):
            meta = session.meta
            if i > 0:
                meta = load_weights(checkpoint, session.chunks, key="--run")
            elif not session.is_hf and args.run:
                meta = read_meta(checkpoint)
            lm = session.lm()
            found = local_records(tasks, TextScorer(lm, session.tokenizer))
            if spec is not None:
                from megatron_ct.evaluation.lm_eval_model import lm_eval_records

                found += lm_eval_records(lm, session.tokenizer, spec, is_main=session.is_main)
            info = where(meta, checkpoint, args.label)
            records += [{**r, **info} for r in found]
            if session.is_main:
                for r in found:
                    if r["template"] in (None, "mean"):
                        err = f" ± {r['stderr']:.4f}" if r.get("stderr") is not None else ""
                        print(f"{checkpoint} | {r['task']} {r['metric']} {r['value']:.4f}{err}", flush=True)
        main_process = session.is_main
    if not main_process:
        return 0
    mode = "a" if args.append else "w"
    with open(args.output, mode, encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if args.plot:
        from megatron_ct.evaluation.plot import plot_downstream

        with open(args.output, encoding="utf-8") as f:
            every = [json.loads(line) for line in f if line.strip()]
        print(plot_downstream(every, args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
