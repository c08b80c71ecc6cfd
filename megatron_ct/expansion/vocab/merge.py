"""Merge into a tokenizer given by path, whichever format it is.

A base tokenizer is a SentencePiece ``.model`` file or a Hugging Face tokenizer directory
(with ``tokenizer.json``), as for :func:`megatron_ct.tokenizer.load_tokenizer`. The merged
tokenizer is written in the same format under an output directory, so it loads with
``load_tokenizer`` (and sentencepiece or ``transformers``) like the base did.
"""

from __future__ import annotations

import os

from megatron_ct.expansion.vocab.select import MergeResult, Segmenter, frequent_strings

SP_OUTPUT_NAME = "tokenizer.model"


def _is_hf_dir(base: str) -> bool:
    if os.path.isdir(base):
        if not os.path.isfile(os.path.join(base, "tokenizer.json")):
            raise ValueError(
                f"{base} has no tokenizer.json; expected a HF tokenizer directory or a SentencePiece .model"
            )
        return True
    if not os.path.isfile(base):
        raise FileNotFoundError(f"base tokenizer {base} does not exist")
    return False


def base_segmenter(base: str | os.PathLike) -> Segmenter:
    """Exact base-model segmentation of piece-form strings (``subword_mean`` sources)."""
    base = os.fspath(base)
    if _is_hf_dir(base):
        from megatron_ct.expansion.vocab.merge_hf import load_tokenizer_json, segmenter

        return segmenter(load_tokenizer_json(os.path.join(base, "tokenizer.json")))
    from megatron_ct.expansion.vocab.merge_sp import load_proto, segmenter

    return segmenter(load_proto(base))


def base_tokenizer_json(base: str | os.PathLike) -> dict | None:
    """The base's ``tokenizer.json`` (checked by ``load_tokenizer_json``), None for a ``.model``."""
    base = os.fspath(base)
    if not _is_hf_dir(base):
        return None
    from megatron_ct.expansion.vocab.merge_hf import load_tokenizer_json

    return load_tokenizer_json(os.path.join(base, "tokenizer.json"))


def is_byte_level_base(base: str | os.PathLike) -> bool:
    """The base is a byte-level BPE ``tokenizer.json`` (pieces are byte-level strings)."""
    from megatron_ct.expansion.vocab.bytelevel import is_byte_level

    tj = base_tokenizer_json(base)
    return tj is not None and is_byte_level(tj)


def protect_strings(base: str | os.PathLike, lines: list[str], top_k: int) -> list[str]:
    """The frequent strings of ``lines`` (``select.frequent_strings``) spelled as the base's pieces."""
    from megatron_ct.expansion.vocab.bytelevel import to_byte_level

    if is_byte_level_base(base):
        return list(dict.fromkeys(to_byte_level(s) for s in frequent_strings(lines, top_k, space=" ")))
    return frequent_strings(lines, top_k)


def merge_tokenizer(
    base: str | os.PathLike,
    candidates: list[str],
    out_dir: str | os.PathLike,
    *,
    max_new: int | None = None,
    protect: list[str] = (),
    splits: dict[str, list[tuple[str, str]]] | None = None,
) -> tuple[MergeResult, str]:
    """Merge ``candidates`` into ``base``; returns the result and the merged tokenizer's path.

    The path is ``out_dir/tokenizer.model`` for a SentencePiece base, else ``out_dir``.
    ``splits`` (byte-level bases): the pairs that make each candidate, from training.
    """
    base, out_dir = os.fspath(base), os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if _is_hf_dir(base):
        from megatron_ct.expansion.vocab.merge_hf import merge_hf_dir

        return merge_hf_dir(base, candidates, out_dir, max_new=max_new, protect=protect, splits=splits), out_dir
    from megatron_ct.expansion.vocab.merge_sp import merge_sp_file

    out_path = os.path.join(out_dir, SP_OUTPUT_NAME)
    return merge_sp_file(base, candidates, out_path, max_new=max_new, protect=protect), out_path
