#!/usr/bin/env python
"""Expand a LLaMA-family tokenizer for a new language/domain and resize a HF model to match.

Steps: learn candidate pieces on domain text (or take --addition-model), append those the
base tokenizer lacks (old ids unchanged), report compression on held-out text, and
optionally resize a Hugging Face checkpoint's embedding and output layer (old rows
bit-identical, new rows from the old tokenizer's pieces of each new token).

Candidates: for a SentencePiece base (a .model, or a tokenizer.json with '▁' for spaces) a
SentencePiece BPE model is trained on the text; for a byte-level BPE base (Llama 3, Qwen,
SmolLM: a tokenizer.json with a ByteLevel pre-tokenizer) merges of the base's own tokens are
learned on the text, so every new token is reachable from the base segmentation. An
--addition-model's pieces are re-spelled as byte strings for a byte-level base.

    python tools/expand_vocab.py --base-tokenizer llama/tokenizer.model --train-text zh.txt \\
        --vocab-size 20000 --output-dir out/zh_tok --heldout-domain zh_val.txt --heldout-general en_val.txt
    # -> out/zh_tok/tokenizer.model, out/zh_tok/expand_vocab.json

    python tools/expand_vocab.py --hf-model llama-2-7b-hf/ --train-text zh.txt --vocab-size 20000 \\
        --max-new-pieces 15000 --output-dir llama-2-7b-zh/
    # -> llama-2-7b-zh/: merged tokenizer.json (+ tokenizer.model), the resized model and
    #    vocab_expansion.json (the rows it added; hf-to-ct carries it to train new_vocab_rows)

Inputs are text files with one document per line. --low-frequency-only keeps only pieces
that leave the segmentation of the frequent strings of --protect-text (general text of
the old language) unchanged. Output is always in the base tokenizer's format.
"""

from __future__ import annotations

import json
import logging
import os
import sys

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, check_output_dir, int_at_least, run_cli  # noqa: E402
from megatron_ct.errors import ConfigError, ConversionError, DataError  # noqa: E402
from megatron_ct.expansion.vocab.merge import (  # noqa: E402
    base_segmenter,
    base_tokenizer_json,
    is_byte_level_base,
    merge_tokenizer,
    protect_strings,
)
from megatron_ct.expansion.vocab.overlap import COMBINATION_INITS  # noqa: E402
from megatron_ct.expansion.vocab.record import expansion_record, write_hf_record  # noqa: E402
from megatron_ct.expansion.vocab.report import compression_report, format_report  # noqa: E402
from megatron_ct.expansion.vocab.resize import INIT_METHODS, VocabResizePlan, resize_embeddings  # noqa: E402
from megatron_ct.expansion.vocab.select import MergeResult  # noqa: E402
from megatron_ct.tokenizer import load_tokenizer  # noqa: E402

log = logging.getLogger("expand_vocab")


def build_parser() -> ToolParser:
    p = ToolParser(__file__, __doc__)
    p.add_argument("--base-tokenizer", help="SentencePiece .model or HF tokenizer directory (default: --hf-model)")
    p.add_argument("--output-dir", required=True, help="merged tokenizer, report and resized model go here")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--train-text", nargs="+", metavar="FILE", help="domain text to train new pieces on")
    src.add_argument("--addition-model", metavar="MODEL", help="take pieces from this SentencePiece model")
    p.add_argument(
        "--vocab-size",
        type=int_at_least(1),
        default=20000,
        help="pieces to learn: size of the trained SentencePiece model, or merges learned on a byte-level "
        "base (default 20000)",
    )
    p.add_argument(
        "--min-frequency",
        type=int_at_least(1),
        default=2,
        help="byte-level base: learn only merges seen at least this often (default 2)",
    )
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="train without byte pieces (default: as the base model)",
    )
    p.add_argument("--max-new-pieces", type=int_at_least(1), default=None, help="cap on appended pieces")
    p.add_argument(
        "--low-frequency-only",
        action="store_true",
        help="append only pieces that do not change how frequent old strings segment",
    )
    p.add_argument(
        "--protect-text",
        nargs="+",
        default=[],
        metavar="FILE",
        help="general text whose frequent strings --low-frequency-only keeps stable",
    )
    p.add_argument("--protect-top-k", type=int_at_least(1), default=20000)
    p.add_argument("--heldout-domain", nargs="*", default=[], metavar="FILE")
    p.add_argument("--heldout-general", nargs="*", default=[], metavar="FILE")
    p.add_argument("--hf-model", metavar="DIR", help="HF causal-LM directory to resize")
    p.add_argument(
        "--ct-checkpoint",
        metavar="DIR",
        help="megatron-ct checkpoint (save root or iter_* dir, any TP/PP) to resize; needs --base-tokenizer",
    )
    p.add_argument("--ct-output", metavar="DIR", help="save root for the resized megatron-ct checkpoint")
    p.add_argument("--init", choices=INIT_METHODS, default="subword_mean", help="new-row init (default subword_mean)")
    p.add_argument("--seed", type=int, default=0, help="seed of --init random and mean_noise")
    p.add_argument(
        "--init-k",
        type=int_at_least(1),
        default=8,
        help="--init focus: overlapping tokens considered per new token; omp: nonzero coefficients (default 8)",
    )
    p.add_argument(
        "--aux-text",
        nargs="+",
        default=None,
        metavar="FILE",
        help="--init focus/omp: target-language text for the auxiliary space, tokenized by the merged "
        "tokenizer (default: --train-text)",
    )
    p.add_argument(
        "--output-init",
        choices=INIT_METHODS,
        default=None,
        help="init of the output layer's new rows when it is its own matrix (untied, or --untie-embeddings); "
        "mean_noise keeps new tokens from stealing probability (default: as --init)",
    )
    p.add_argument(
        "--untie-embeddings",
        action="store_true",
        help="--hf-model with tied embeddings: give the output layer its own matrix (old rows copied), so "
        "--output-init can differ from --init",
    )
    p.add_argument(
        "--pad-to-multiple-of", type=int_at_least(1), default=1, help="pad the resized vocabulary (default 1: none)"
    )
    return p


TEXT_FLAGS = ("train_text", "protect_text", "heldout_domain", "heldout_general", "aux_text")


def read_lines(paths: list[str], flag: str) -> list[str]:
    lines = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                lines.extend(line.rstrip("\n") for line in f if line.strip())
        except UnicodeDecodeError as e:
            raise DataError(f"{flag} {path}: not UTF-8 text (byte {e.start}); expected a text file") from None
    return lines


def check_args(args) -> str:
    """Every option and input file, before any work; returns the base tokenizer."""
    base = args.base_tokenizer or args.hf_model
    if base is None:
        raise ConfigError("--base-tokenizer: expected it, or --hf-model (whose tokenizer is the base)")
    if args.low_frequency_only != bool(args.protect_text):
        raise ConfigError("--low-frequency-only and --protect-text go together (the text defines frequent strings)")
    for key in TEXT_FLAGS:
        for path in getattr(args, key) or ():
            if not os.path.isfile(path):
                raise DataError(f"--{key.replace('_', '-')} {path}: no such file; expected a text file")
    if args.hf_model and not os.path.isfile(os.path.join(args.hf_model, "config.json")):
        raise DataError(f"--hf-model {args.hf_model}: no config.json; expected a Hugging Face model directory")
    needs_aux = {args.init, args.output_init} & set(COMBINATION_INITS)
    if needs_aux and not (args.aux_text or args.train_text):
        raise ConfigError(
            f"--init {sorted(needs_aux)[0]}: builds its auxiliary space from target-language text; expected "
            "--aux-text FILE (or --train-text)"
        )
    if args.untie_embeddings and not args.hf_model:
        raise ConfigError("--untie-embeddings: unties a Hugging Face model; expected --hf-model")
    check_output_dir(args.output_dir, "--output-dir")
    if args.ct_output:
        check_output_dir(args.ct_output, "--ct-output")
    return base


def addition_pieces(args, base: str) -> tuple[list[str], dict | None]:
    """Candidate pieces (and, byte-level, the pairs that make them): from --addition-model,
    or learned on --train-text."""
    from megatron_ct.expansion.vocab.merge_sp import candidate_pieces, load_proto

    if is_byte_level_base(base):
        from megatron_ct.expansion.vocab.bytelevel import pieces_from_text, train_on_base_tokens

        tj = base_tokenizer_json(base)
        if args.addition_model:
            return pieces_from_text(tj, candidate_pieces(load_proto(args.addition_model)))
        return train_on_base_tokens(
            tj, read_lines(args.train_text, "--train-text"), args.vocab_size, args.min_frequency
        )
    if args.addition_model:
        return candidate_pieces(load_proto(args.addition_model)), None
    from megatron_ct.expansion.vocab.train_sp import SPTrainConfig, train_sentencepiece

    overrides = {"vocab_size": args.vocab_size, "character_coverage": args.character_coverage}
    if not args.byte_fallback:
        overrides["byte_fallback"] = False
    sp_file = base if os.path.isfile(base) else os.path.join(base, "tokenizer.model")
    config = (
        SPTrainConfig.like(load_proto(sp_file), **overrides) if os.path.isfile(sp_file) else SPTrainConfig(**overrides)
    )
    model = train_sentencepiece(args.train_text, os.path.join(args.output_dir, "addition"), config)
    return candidate_pieces(load_proto(model)), None


def aux_space(args, merged_tok):
    """The FOCUS/OMP auxiliary space: --aux-text (or --train-text) tokenized by the merged tokenizer."""
    import time

    from megatron_ct.expansion.vocab.overlap import AuxSpaceConfig, build_aux_space

    t0 = time.perf_counter()
    docs = merged_tok.encode_batch(read_lines(args.aux_text or args.train_text, "--aux-text"))
    space = build_aux_space(docs, AuxSpaceConfig(k=args.init_k, seed=args.seed))
    log.info(
        "auxiliary space: %d tokens x %d dims from %d documents (%.1f s)",
        *space.vectors.shape, len(docs), time.perf_counter() - t0,
    )  # fmt: skip
    return space


def resize_plan(result: MergeResult, base: str, rows: int, args, divisible_by: int, space=None) -> VocabResizePlan:
    """Plan for a model with ``rows`` vocabulary rows.

    Usually ``rows`` >= the base tokenizer's ids and new tokens take rows from
    ``result.first_new_id`` on (rows past the tokenizer are unused padding, e.g. Qwen's). A
    tokenizer may also have added special tokens past the embedding (SmolLM2: 5 FIM tokens
    over 49152 rows); those rows are added too, with the mean of the old rows (they have no
    text to average).
    """
    gap = max(result.first_new_id - rows, 0)
    sources = ((),) * gap + tuple(map(tuple, base_segmenter(base)(result.new_pieces)))
    old_vocab_size = result.first_new_id - gap
    combinations = ()
    method = next((m for m in (args.init, args.output_init) if m in COMBINATION_INITS), None)
    if method is not None:
        from megatron_ct.expansion.vocab.overlap import overlap_combinations

        combinations = overlap_combinations(method, space, old_vocab_size, len(sources), args.init_k)
        log.info(
            "%s: %d of %d new tokens combine overlapping tokens' rows (mean %.1f each); the rest keep subword_mean",
            method, sum(map(bool, combinations)), len(sources),
            sum(map(len, combinations)) / max(sum(map(bool, combinations)), 1),
        )  # fmt: skip
    return VocabResizePlan(
        old_vocab_size=old_vocab_size,
        sources=sources,
        init=args.init,
        divisible_by=divisible_by,
        seed=args.seed,
        combinations=combinations,
        output_init=args.output_init,
        untie=args.untie_embeddings,
    )


def resize_hf_causal_lm(model, plan: VocabResizePlan) -> None:
    """Resize a transformers causal LM's input embedding and output layer in place."""
    import torch

    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embedding
    if embedding.shape[0] < plan.old_vocab_size:
        raise ConversionError(
            f"model embedding has {embedding.shape[0]} rows; expected at least the base tokenizer's "
            f"{plan.old_vocab_size}"
        )
    new_embedding, new_head = resize_embeddings(embedding.detach(), None if tied else head.weight.detach(), plan)
    # resize_token_embeddings rebuilds the modules (and re-ties); the values are then ours.
    model.resize_token_embeddings(new_embedding.shape[0], mean_resizing=False)
    if tied and plan.untie:
        # Its own lm_head parameter, and a config that says so: save_pretrained writes
        # lm_head.weight and from_pretrained / hf-to-ct read the model as untied.
        model.config.tie_word_embeddings = False
        model.config.get_text_config().tie_word_embeddings = False
        model.get_output_embeddings().weight = torch.nn.Parameter(new_head.clone())
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_embedding)
        if not tied or plan.untie:
            model.get_output_embeddings().weight.copy_(new_head)


def run(args) -> None:
    base = check_args(args)
    base_tok = load_tokenizer(base)  # refuses a directory whose files disagree, before any work
    os.makedirs(args.output_dir, exist_ok=True)
    candidates, splits = addition_pieces(args, base)
    protect = (
        protect_strings(base, read_lines(args.protect_text, "--protect-text"), args.protect_top_k)
        if args.protect_text
        else []
    )
    result, merged_path = merge_tokenizer(
        base, candidates, args.output_dir, max_new=args.max_new_pieces, protect=protect, splits=splits
    )

    corpora = {
        name: read_lines(paths, f"--heldout-{name}")
        for name, paths in (("domain", args.heldout_domain), ("general", args.heldout_general))
        if paths
    }
    merged_tok = load_tokenizer(merged_path)
    if (merged_tok.eod_id, merged_tok.bos_id) != (base_tok.eod_id, base_tok.bos_id):
        log.warning(
            "the merged tokenizer's EOD/BOS ids %s differ from the base's %s (the base directory's model files set "
            "them); preprocess with the resized model's directory, or copy the base's config.json next to %s",
            (merged_tok.eod_id, merged_tok.bos_id),
            (base_tok.eod_id, base_tok.bos_id),
            merged_path,
        )
    needs_aux = {args.init, args.output_init} & set(COMBINATION_INITS)
    space = aux_space(args, merged_tok) if needs_aux and (args.hf_model or args.ct_checkpoint) else None
    report = compression_report(base_tok, merged_tok, corpora, len(result.new_pieces))
    print(format_report(report))

    summary = {
        "base_tokenizer": os.path.abspath(base),
        "merged_tokenizer": os.path.abspath(merged_path),
        "first_new_id": result.first_new_id,
        "new_pieces": result.new_pieces,
        "report": report,
    }
    if args.hf_model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.hf_model, local_files_only=True, dtype="auto")
        rows = model.get_input_embeddings().weight.shape[0]
        plan = resize_plan(result, base, rows, args, args.pad_to_multiple_of, space)
        resize_hf_causal_lm(model, plan)
        model.save_pretrained(args.output_dir)
        record = expansion_record(plan.old_vocab_size, plan.new_vocab_size, args.init, os.path.abspath(args.hf_model))
        write_hf_record(args.output_dir, record)
        summary["model"] = {
            "init": args.init,
            "vocab_rows": plan.padded_size(),
            "dir": os.path.abspath(args.output_dir),
            "vocab_expansion": record,
        }
        print(f"resized model: {plan.padded_size()} vocabulary rows ({args.init}) -> {args.output_dir}")
    if args.ct_checkpoint:
        from megatron_ct.checkpoint.rewrite import open_checkpoint
        from megatron_ct.expansion.vocab.checkpoint import resize_ct_checkpoint

        meta = open_checkpoint(args.ct_checkpoint)[2]
        divisible_by = meta.model["make_vocab_size_divisible_by"]
        plan = resize_plan(result, base, meta.true_vocab_size, args, divisible_by, space)
        out = args.ct_output or os.path.join(args.output_dir, "ct_checkpoint")
        rows = resize_ct_checkpoint(args.ct_checkpoint, out, plan)
        summary["ct_checkpoint"] = {"dir": os.path.abspath(out), "vocab_size": plan.new_vocab_size, "rows": rows}
        print(f"resized megatron-ct checkpoint: vocab {plan.new_vocab_size} ({rows} rows, {args.init}) -> {out}")
    with open(os.path.join(args.output_dir, "expand_vocab.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(build_parser(), run, argv, expected=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
