#!/usr/bin/env python
"""Tokenize corpora into megatron-core IndexedDataset .bin/.idx files (plus a .meta.json sidecar).

Inputs: JSON lines (.jsonl/.json), text (.txt, a document per line), each optionally .gz/.zst;
parquet (.parquet, streamed by row group); Hugging Face datasets save_to_disk folders (.arrow).
Flag names follow Megatron-LM's tools/preprocess_data.py. Examples:

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --tokenizer llama/tokenizer.model \\
        --output-prefix data/corpus --workers 8
    # -> data/corpus_text_document.bin/.idx/.meta.json, data/corpus_summary.json

    # one task of a SLURM array (--array=0-63): shard = SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT
    python tools/preprocess_data.py --input 'web/*.parquet' --json-keys content --tokenizer model_dir/ \\
        --output-prefix data/web --workers 16
    # -> data/web-00007-of-00064_content_document.bin/.idx; train on the glob data/web-*_content_document

    python tools/preprocess_data.py --input sft.jsonl --instruction-keys instruction output \\
        --tokenizer hf_tokenizer_dir/ --output-prefix data/sft
    # -> data/sft_instruction_document.bin/.idx holding "{instruction}\\n{output}" documents
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, check_output_dir, run_cli  # noqa: E402
from megatron_ct.preprocess.pipeline import (  # noqa: E402
    PreprocessConfig,
    format_summary,
    preprocess,
)


def build_parser() -> ToolParser:
    p = ToolParser(__file__, __doc__)
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="input files, folders or quoted globs: .jsonl/.json (JSON lines), "
        ".txt (one document per line), optionally .gz/.zst; .parquet; a datasets "
        "save_to_disk folder or .arrow file",
    )
    p.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="JSON keys (parquet/Arrow columns) to tokenize, one output each (default: text)",
    )
    p.add_argument(
        "--instruction-keys",
        nargs=2,
        default=None,
        metavar=("INSTR", "RESP"),
        help="write one '{INSTR}\\n{RESP}' document per line to {prefix}_instruction_document "
        "(unsupervised instruction data)",
    )
    p.add_argument(
        "--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx and {prefix}_summary.json"
    )
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file or Hugging Face tokenizer directory")
    p.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append the EOD id after each document (default: on)",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="refresh docs/s and tokens/s on the progress bar every N documents (default: 1000)",
    )
    p.add_argument(
        "--shard-index",
        type=int,
        default=None,
        metavar="I",
        help="process shard I of --num-shards (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, else 0)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        metavar="N",
        help="split the inputs by file and parquet row group into N shards, each written to "
        "{prefix}-{I:05d}-of-{N:05d}_... (default: SLURM_ARRAY_TASK_COUNT, else 1)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad inputs or options)."""
    # Our own warnings (skipped lines) at INFO and up; megatron-core's import-time
    # INFO chatter about FSDP backends is irrelevant to tokenization.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("megatron_ct").setLevel(logging.INFO)
    return run_cli(build_parser(), run, argv)


def run(args) -> None:
    config = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        json_keys=args.json_keys,
        instruction_keys=tuple(args.instruction_keys) if args.instruction_keys else None,
        append_eod=args.append_eod,
        workers=args.workers,
        log_interval=args.log_interval,
        progress=args.progress,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
    )
    check_output_dir(os.path.dirname(os.path.abspath(args.output_prefix)), "--output-prefix")
    summary = preprocess(config)
    print(format_summary(summary))
    print(f"  summary: {summary['summary']}")


if __name__ == "__main__":
    sys.exit(main())
