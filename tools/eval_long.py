#!/usr/bin/env python
"""Long-context probes on a checkpoint: passkey retrieval, needle in a haystack, loss by position.

    # passkey accuracy over a length x depth grid, heat map PNG
    python tools/eval_long.py --checkpoint runs/ct --lengths 512 1024 2048 --depths 0 0.25 0.5 0.75 1 \\
        --trials 5 --output long.jsonl --heatmap long.png
    # the base before CT beside it (labels: one heat map panel each), a real-text haystack (needle),
    # and bits per byte by position bucket on held-out documents
    python tools/eval_long.py --checkpoint base_hf --label base --output long.jsonl
    python tools/eval_long.py --checkpoint runs/ct --label ct --haystack book.txt \\
        --position-text held_out.jsonl --output long.jsonl --append --heatmap long.png
    # a long context split over 2 ranks (context parallelism), or at TP2 x PP2
    torchrun --nproc_per_node 2 tools/eval_long.py --checkpoint runs/ct --context-parallel-size 2 ...

--checkpoint is a Hugging Face directory or one of our checkpoints (any saved layout), run at
the TP/PP/CP given here by every launched process. Lengths may exceed the model's
max_position_embeddings (to show what happens past the trained length). Each trial states a
random 5-digit key once, at the given depth of a haystack of exactly --lengths tokens, and asks
for it at the end; it succeeds when the key is the greedy continuation. JSON lines:
{"task": "passkey" | "needle", "length", "depth", "trials", "accuracy", "key_logprob", ...} and
{"task": "position", "start", "end", "tokens", "loss", "bits_per_byte", ...}, each with
"label", "iteration" and "checkpoint". Method: megatron_ct/evaluation/long.py.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, add_model_flags, check_output_file, int_at_least, run_cli  # noqa: E402


def build_parser() -> ToolParser:
    p = ToolParser(__file__, __doc__)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="HF model directory or megatron-ct checkpoint")
    p.add_argument("--lengths", type=int_at_least(16), nargs="+", default=[512, 1024, 2048], help="row lengths")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="key depths")
    p.add_argument("--trials", type=int_at_least(1), default=5, help="keys per (length, depth) cell (5)")
    p.add_argument("--haystack", metavar="FILE", help="text whose tokens are the haystack (a needle test)")
    p.add_argument("--no-passkey", action="store_true", help="skip the filler passkey test")
    p.add_argument("--position-text", metavar="FILE", help="documents (.txt/.jsonl) for loss by position")
    p.add_argument("--position-length", type=int_at_least(2), help="tokens per document there (max --lengths)")
    p.add_argument("--bucket", type=int_at_least(1), default=256, help="position bucket width in tokens (256)")
    p.add_argument("--seed", type=int, default=0, help="keys and haystack offsets (0)")
    p.add_argument("--output", required=True, metavar="FILE", help="JSON lines of results")
    p.add_argument("--append", action="store_true", help="add to --output instead of replacing it")
    p.add_argument("--label", help="label of these records (e.g. base)")
    p.add_argument("--heatmap", metavar="PNG", help="draw the retrieval accuracy of --output's records")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_model_flags(p, micro_batch_size=1, rows="rows")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv, expected=(ValueError, FileNotFoundError))


def run(args) -> int:
    from megatron_ct.errors import ConfigError, DataError

    # The arguments first: their errors come before torch is imported.
    check_output_file(args.output, "--output")
    if args.heatmap:
        check_output_file(args.heatmap, "--heatmap")
    if args.no_passkey and not args.haystack and not args.position_text:
        raise ConfigError("--no-passkey: expected --haystack or --position-text then (nothing to run)")
    hay_text = None
    if args.haystack:
        if not os.path.isfile(args.haystack):
            raise DataError(f"--haystack {args.haystack}: no such file")
        with open(args.haystack, encoding="utf-8") as f:
            hay_text = f.read()

    from megatron_ct.evaluation import long
    from megatron_ct.evaluation.bpb import read_documents
    from megatron_ct.evaluation.session import EvalOptions, open_model

    texts = read_documents(args.position_text) if args.position_text else None  # bad input: before the model
    longest = max(args.lengths + ([args.position_length] if args.position_length else []))
    opts = EvalOptions.from_args(args, seq_length=longest, progress=False)
    records: list[dict] = []
    with open_model(args.checkpoint, args.tokenizer, opts) as session:
        tok = session.tokenizer
        lm = session.lm(max_length=longest, beyond_trained=True)
        kinds = ([] if args.no_passkey else [("passkey", None)]) + ([("needle", hay_text)] if hay_text else [])
        for task, text in kinds:
            probes = long.build_probes(
                tok, long.haystack_ids(tok, text), args.lengths, args.depths, args.trials, args.seed
            )
            records += long.retrieval_records(lm, probes, task, progress=args.progress)
        if texts is not None:
            batch = opts.micro_batch_size * max(opts.pipeline_model_parallel_size, 1)
            records += long.position_records(session, texts, args.position_length or longest, args.bucket, batch)
        meta = session.meta
        info = {
            "label": args.label,
            "iteration": meta.iteration if meta is not None else None,
            "checkpoint": os.path.abspath(args.checkpoint),
        }
        records = [{**r, **info} for r in records]
        if session.is_main:
            mode = "a" if args.append else "w"
            with open(args.output, mode, encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            for r in records:
                print(json.dumps(r))
            if args.heatmap:
                with open(args.output, encoding="utf-8") as f:
                    every = [json.loads(line) for line in f if line.strip()]
                print(f"heat map: {long.plot_heatmaps(every, args.heatmap)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
