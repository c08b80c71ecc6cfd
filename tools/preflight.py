#!/usr/bin/env python
"""Pre-flight report for a continual-pretraining setup, before spending GPU time.

    # everything the trainer would use: checkpoint.load, data.datasets, data.tokenizer, model.vocab_size
    python tools/preflight.py --config runs/ct/curriculum.yaml [key=value ...]
    # or piece by piece
    python tools/preflight.py --checkpoint ckpt/llama2 --data zh=data/zh_text_document data/en_text_document \\
        --tokenizer llama-2-7b-hf/tokenizer.model --hf-config llama-2-7b-hf
    python tools/preflight.py --config recipe.yaml --json > preflight.json

Checks:
  untrained rows   embedding / output-layer rows that are all zero or have a norm far below the
                   median (--row-norm-ratio, default 0.1), a known cause of gradient blow-ups at
                   the start of CT; the ones the data contains are named
  unused ids       vocabulary ids that never occur in the training data (counted over every .bin;
                   counts are cached beside the data); ids a vocabulary expansion added that never
                   occur are a warning, and so are ids outside the model's vocabulary
  special ids      BOS/EOS/EOD/pad of the tokenizer, the data (the token that ends, or starts,
                   the documents) and the model (the HF config recorded in the checkpoint, or
                   --hf-config) must agree

Explicit flags override what --config gives. Exit status: 0 clean (notes only), 1 warnings,
2 bad input (a missing file, an unreadable checkpoint; one line, --debug for a traceback).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, float_above, int_at_least, run_cli  # noqa: E402
from megatron_ct.errors import ConfigError  # noqa: E402


def build_parser() -> ToolParser:
    p = ToolParser(__file__, __doc__)
    p.add_argument("--config", help="trainer recipe; further key=value words override it as for pretrain_ct.py")
    p.add_argument("--checkpoint", help="our checkpoint (save root or iter_* directory)")
    p.add_argument("--data", nargs="+", help="training datasets: PREFIX or NAME=PREFIX (.bin/.idx pairs)")
    p.add_argument("--tokenizer", help="SentencePiece .model or Hugging Face tokenizer directory")
    p.add_argument("--hf-config", help="the model's Hugging Face config.json (or its directory), for token ids")
    p.add_argument(
        "--vocab-size", type=int_at_least(1), help="model vocabulary (default: checkpoint, config or tokenizer)"
    )
    p.add_argument(
        "--row-norm-ratio", type=float_above(0), default=None, help="untrained below this x median norm (0.1)"
    )
    p.add_argument("--no-count", dest="count", action="store_false", help="skip counting ids over the data")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def _datasets(words: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, word in enumerate(words):
        name, prefix = word.split("=", 1) if "=" in word else (os.path.basename(word) or f"data{i}", word)
        if not name or not prefix:
            raise ConfigError(f"--data {word}: expected PREFIX or NAME=PREFIX")
        out[name if name not in out else f"{name}_{i}"] = prefix
    return out


def run(args, overrides: list[str]) -> int:
    from megatron_ct.errors import DataError
    from megatron_ct.training import preflight as pf

    kwargs: dict = {}
    tokenizer_where = f"tokenizer {args.tokenizer}"
    if args.config:
        from megatron_ct.config import load_config

        cfg = load_config(args.config, overrides)
        if cfg.checkpoint.load and not args.checkpoint:
            kwargs.update(pf.checkpoint_inputs(cfg.checkpoint.load))
        if cfg.data.source == "indexed" and not args.data:
            kwargs["datasets"], kwargs["data_root"] = cfg.data.datasets, cfg.data.data_root
            kwargs["datasets_key"] = pf.CONFIG_DATASETS_KEY  # errors name data.datasets.NAME, as training's
        if cfg.data.tokenizer and not args.tokenizer:
            tokenizer_where, args.tokenizer = f"data.tokenizer {cfg.data.tokenizer}", cfg.data.tokenizer
        kwargs["vocab_size"] = cfg.model.vocab_size
    elif overrides:
        raise ConfigError(f"{overrides[0]}: unknown argument (key=value overrides need --config)")
    if args.checkpoint:
        kwargs.update(pf.checkpoint_inputs(args.checkpoint))
    if args.data:
        kwargs["datasets"] = _datasets(args.data)
    if args.tokenizer:
        from megatron_ct.tokenizer import load_tokenizer

        try:
            kwargs["tokenizer"] = load_tokenizer(args.tokenizer)
        except (OSError, ValueError) as e:
            raise DataError(f"--tokenizer: {e}") from None
        kwargs["tokenizer_where"] = tokenizer_where
    if args.hf_config:
        kwargs["hf_config"] = pf.read_hf_config_file(args.hf_config)
        kwargs["model_where"] = args.hf_config
    if args.vocab_size is not None:
        kwargs["vocab_size"] = args.vocab_size
    if args.row_norm_ratio is not None:
        kwargs["ratio"] = args.row_norm_ratio
    if not any(k in kwargs for k in ("vocab_rows", "datasets", "tokenizer", "hf_config")):
        raise ConfigError("nothing to check: give --config, or some of --checkpoint, --data, --tokenizer, --hf-config")
    report = pf.preflight(**kwargs, count_ids=args.count, progress=args.progress and not args.json)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format())
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv, extra_args=True, expected=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
