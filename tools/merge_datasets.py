#!/usr/bin/env python
"""Merge IndexedDataset .bin/.idx prefixes (e.g. the shards of a SLURM array run) into one.

The curriculum reads a glob of prefixes directly (data.datasets.web.prefix: data/web-*_text_document),
so merging is optional: for tools that want one file, or to reduce the number of open files.

    python tools/merge_datasets.py --input 'data/web-*-of-00064_text_document' --output-prefix data/web_text_document

Documents keep their order (inputs in the order given, globs sorted); merging the shards of
a run gives the bytes of the unsharded run. Inputs are validated first; different tokenizers
or token dtypes are refused.
"""

from __future__ import annotations

import os
import sys

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, check_output_dir, run_cli  # noqa: E402
from megatron_ct.preprocess.merge import merge_datasets  # noqa: E402


def build_parser() -> ToolParser:
    p = ToolParser(__file__, __doc__)
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PREFIX",
        help="dataset prefixes (no .bin/.idx) or quoted globs of prefixes, merged in this order",
    )
    p.add_argument("--output-prefix", required=True, help="writes {prefix}.bin/.idx/.meta.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output prefix")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad inputs or options)."""
    return run_cli(build_parser(), merge, argv)


def merge(args) -> None:
    check_output_dir(os.path.dirname(os.path.abspath(args.output_prefix)), "--output-prefix")
    meta = merge_datasets(args.input, args.output_prefix, overwrite=args.overwrite, progress=args.progress)
    print(
        f"merged {len(meta.extra['inputs'])} prefix(es): {meta.documents:,} documents, {meta.tokens:,} tokens "
        f"({meta.dtype}) -> {args.output_prefix}.bin/.idx"
    )


if __name__ == "__main__":
    sys.exit(main())
