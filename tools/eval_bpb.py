#!/usr/bin/env python
"""Bits per byte of any checkpoint on any text: the number CT is judged by.

Comparable across tokenizers: the NLL of every token of a document, summed, over the UTF-8
bytes of that document. Each document (a JSONL line's "text", or a line of plain text) is
scored on its own as [EOS] + its tokens, cut to --seq-length predicted tokens.

    python tools/eval_bpb.py --checkpoint hf_model/ --input zh_valid.jsonl en_valid.txt --output bpb.jsonl
    torchrun --nproc_per_node 4 tools/eval_bpb.py --checkpoint runs/ct \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --input zh_valid.jsonl --output bpb.jsonl

--checkpoint is a Hugging Face model directory (scored by transformers in one process) or one
of our checkpoints (a save root or an iter_* directory, saved at any layout), run at the TP/PP
given here by every launched process (the rest of the processes are data-parallel). The
tokenizer defaults to the one stored with the checkpoint (the HF directory, or hf_assets/
beside a converted checkpoint). One JSON line per input, to stdout and --output:
{"input", "documents", "tokens", "bytes", "loss", "bits_per_byte"}; loss is the mean NLL in
nats per predicted token.
"""

from __future__ import annotations

import os
import sys

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, add_model_flags, check_output_file, int_at_least, run_cli  # noqa: E402


def build_parser() -> ToolParser:
    p = ToolParser(__file__, __doc__)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="HF model directory or megatron-ct checkpoint")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl/.json ('text') or text files")
    p.add_argument("--output", metavar="FILE", help="write the JSON lines here too (replaced atomically)")
    add_model_flags(p, micro_batch_size=4, rows="documents")
    p.add_argument("--seq-length", type=int_at_least(1), default=2048, help="tokens per document at most (2048)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def write_atomically(path: str, lines: list[str]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv, expected=(ValueError, FileNotFoundError))


def run(args) -> int:
    from megatron_ct.evaluation.bpb import EvalOptions, evaluate

    opts = EvalOptions.from_args(args)
    if args.output:
        check_output_file(args.output, "--output")
    results = evaluate(args.checkpoint, args.input, args.tokenizer, opts)
    if results is None:  # not global rank 0
        return 0
    lines = [r.to_json() for r in results]
    for line in lines:
        print(line)
    if args.output:
        write_atomically(args.output, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
