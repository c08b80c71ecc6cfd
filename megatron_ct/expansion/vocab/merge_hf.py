"""Append pieces to a Hugging Face ``tokenizer.json`` BPE tokenizer, keeping every old id.

Supported layout: the LLaMA/SentencePiece-style BPE that ``transformers`` converts from a
SentencePiece model (tests/material.py: ``build_hf_llama_tokenizer``): vocab
strings use ``'▁'`` for a space (a ``Metaspace`` pre-tokenizer, or the older
``Prepend('▁')`` + ``Replace(' ', '▁')`` normaliser), usually with ``byte_fallback``.
Byte-level BPE (GPT-2, LLaMA-3, Qwen: a ``ByteLevel`` pre-tokenizer) is refused: there a
Chinese piece is a string of byte symbols whose intermediate merges are not pieces of a
SentencePiece addition model, so it needs a byte-level trainer instead.

New tokens get ids after every existing id (vocab and added tokens); added/special tokens
and the rest of the pipeline are unchanged. Merges: a BPE ``tokenizer.json`` only joins
two symbols if the pair is listed in ``merges``, so for every new token all of its splits
into two merged-vocab tokens are added, as are the splits of old tokens that involve a new
token (SentencePiece joins any pair whose concatenation is a piece, so without them the two
formats would disagree). When the old merges are ordered by the id of the token they
produce, as ``transformers``' SentencePiece conversion orders them, the added merges are
placed in that same order; the merged ``tokenizer.json`` is then the one ``transformers``
would convert from the merged SentencePiece model. Otherwise merges producing old tokens
follow the old merges and new tokens' merges come last.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil

from megatron_ct.expansion.vocab.select import MergeResult, Segmenter, choose_new_pieces

TOKENIZER_JSON = "tokenizer.json"
# Files of a HF tokenizer directory besides tokenizer.json (copied unchanged).
_COPIED_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template")


def load_tokenizer_json(path: str | os.PathLike) -> dict:
    """Read a ``tokenizer.json`` and check it is a layout this module can merge into."""
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable tokenizer.json ({exc})") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model.type is {model.get('type')!r}; expected 'BPE'")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{path}: model.{key}={model[key]!r}; expected none (LLaMA metaspace layout)")
    if "ByteLevel" in json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer"), tj.get("decoder")]):
        raise ValueError(
            f"{path}: byte-level BPE (ByteLevel pre-tokenizer/decoder) is not supported; expected the "
            "LLaMA metaspace layout ('▁' for spaces)"
        )
    return tj


def _pair(merge) -> tuple[str, str]:
    # tokenizers >= 0.20 writes merges as [left, right]; older files use "left right".
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


def segmenter(tj: dict) -> Segmenter:
    """Segment piece-form strings with the BPE model alone (no normaliser, no pre-tokenizer).

    Same role as ``merge_sp.segmenter``: the exact ids the model gives a piece's text.
    """
    from tokenizers import Tokenizer

    model = Tokenizer.from_str(json.dumps(tj)).model
    return lambda strings: [[t.id for t in model.tokenize(s)] for s in strings]


def _next_id(tj: dict) -> int:
    ids = list(tj["model"]["vocab"].values()) + [t["id"] for t in tj.get("added_tokens", [])]
    return max(ids) + 1


def append_tokens(tj: dict, pieces: list[str]) -> dict:
    """Copy of ``tj`` with ``pieces`` appended to the vocab and the merges that build them."""
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    old = dict(vocab)
    start = _next_id(tj)
    for i, piece in enumerate(pieces):
        vocab[piece] = start + i
    new = set(pieces)

    old_merges = tj["model"]["merges"]
    pairs = [_pair(m) for m in old_merges]
    known = set(pairs)

    def splits(token: str, need_new: bool) -> list[tuple[str, str]]:
        # Ordered by left length, as transformers' generate_merges orders one token's splits.
        out = []
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            wanted = not need_new or left in new or right in new
            if wanted and left in vocab and right in vocab and (left, right) not in known:
                out.append((left, right))
        return out

    for_old = [p for token in old for p in splits(token, need_new=True)]
    for_new = [p for token in pieces for p in splits(token, need_new=False)]

    def key(pair: tuple[str, str]) -> tuple[int, int, int]:
        return vocab[pair[0] + pair[1]], len(pair[0]), len(pair[1])

    old_keys = [key(p) for p in pairs]
    if all(a <= b for a, b in itertools.pairwise(old_keys)):
        merged_pairs = sorted(pairs + for_old + for_new, key=key)  # stable: old order kept
    else:
        merged_pairs = pairs + sorted(for_old, key=key) + for_new
    as_strings = bool(old_merges) and isinstance(old_merges[0], str)
    merges = [f"{a} {b}" if as_strings else [a, b] for a, b in merged_pairs]

    # Only vocab and merges change; the rest is shared with ``tj`` (treated as read-only).
    return {**tj, "model": {**tj["model"], "vocab": vocab, "merges": merges}}


def merge_hf(
    tj: dict, candidates: list[str], *, max_new: int | None = None, protect: list[str] = ()
) -> tuple[dict, MergeResult]:
    """Merge candidate pieces into a ``tokenizer.json`` dict; same rules as ``merge_sp``."""
    vocab = tj["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in tj.get("added_tokens", [])}
    pieces = choose_new_pieces(
        candidates,
        taken,
        max_new=max_new,
        protect=protect,
        segment_base=segmenter(tj),
        segmenter_for=lambda chosen: segmenter(append_tokens(tj, chosen)),
    )
    return append_tokens(tj, pieces), MergeResult(new_pieces=pieces, first_new_id=_next_id(tj))


def merge_hf_dir(
    base_dir: str | os.PathLike, candidates: list[str], out_dir: str | os.PathLike, **kwargs
) -> MergeResult:
    """:func:`merge_hf` on a tokenizer directory, written to ``out_dir``.

    The other tokenizer files (``tokenizer_config.json``, ``special_tokens_map.json``,
    ``added_tokens.json``, chat templates) are copied; a ``tokenizer.model`` next to
    ``tokenizer.json`` is merged with the same pieces (``merge_sp``), so the two files keep
    agreeing. The output is checked to load in ``transformers``.
    """
    base_dir, out_dir = os.fspath(base_dir), os.fspath(out_dir)
    path = os.path.join(base_dir, TOKENIZER_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; expected a Hugging Face tokenizer directory with tokenizer.json")
    merged, result = merge_hf(load_tokenizer_json(path), candidates, **kwargs)
    os.makedirs(out_dir, exist_ok=True)
    # Only tokenizer files: the base directory may be a whole model directory.
    for name in os.listdir(base_dir):
        src = os.path.join(base_dir, name)
        if (
            os.path.isfile(src)
            and name.startswith(_COPIED_PREFIXES)
            and name not in (TOKENIZER_JSON, "tokenizer.model")
        ):
            shutil.copyfile(src, os.path.join(out_dir, name))
    # Written by the tokenizers library itself: it parses (validates) and pretty-prints fast.
    from tokenizers import Tokenizer

    Tokenizer.from_str(json.dumps(merged, ensure_ascii=False)).save(os.path.join(out_dir, TOKENIZER_JSON))
    sp_path = os.path.join(base_dir, "tokenizer.model")
    if os.path.isfile(sp_path):
        from megatron_ct.expansion.vocab.merge_sp import append_pieces, load_proto, save_proto

        base_sp = load_proto(sp_path)
        if len(base_sp.pieces) != result.first_new_id:
            raise ValueError(
                f"{sp_path} has {len(base_sp.pieces)} pieces but {path} puts new tokens at id "
                f"{result.first_new_id}; expected the two files to describe the same vocabulary"
            )
        save_proto(append_pieces(base_sp, result.new_pieces), os.path.join(out_dir, "tokenizer.model"))
    _check_loads(out_dir, result)
    return result


def _check_loads(out_dir: str, result: MergeResult) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if len(tok) != result.vocab_size:
        raise RuntimeError(f"{out_dir}: transformers loads {len(tok)} tokens, expected {result.vocab_size}")
