"""Append pieces to a Hugging Face ``tokenizer.json`` BPE tokenizer, keeping every old id.

Two layouts:

* LLaMA/SentencePiece-style BPE, as ``transformers`` converts it from a SentencePiece model
  (tests/material.py: ``build_hf_llama_tokenizer``): vocab strings use ``'▁'`` for a space
  (a ``Metaspace`` pre-tokenizer, or the older ``Prepend('▁')`` + ``Replace(' ', '▁')``
  normaliser), usually with ``byte_fallback``.
* Byte-level BPE (GPT-2, Llama 3, Qwen2/2.5/3, SmolLM: a ``ByteLevel`` pre-tokenizer and
  decoder): vocab strings are UTF-8 bytes in GPT-2's byte alphabet
  (:mod:`megatron_ct.expansion.vocab.bytelevel`); pieces must be given in that spelling.

New tokens get ids after every existing id (vocab and added tokens); added/special tokens,
the normaliser, the pre-tokenizer and the decoder are unchanged. Merges: a BPE
``tokenizer.json`` only joins two symbols if the pair is listed in ``merges``, so for every
new token its splits into two merged-vocab tokens are added (for byte-level, the pairs the
trainer joined come first: ``splits``).

Metaspace: the splits of old tokens that involve a new token are added too (SentencePiece
joins any pair whose concatenation is a piece, so without them the two formats would
disagree). When the old merges are ordered by the id of the token they produce, as
``transformers``' SentencePiece conversion orders them, the added merges are placed in that
same order; the merged ``tokenizer.json`` is then the one ``transformers`` would convert from
the merged SentencePiece model. Otherwise merges producing old tokens follow the old merges
and new tokens' merges come last.

Byte-level: the old merges stay exactly as they are and every new merge (each producing a
new token) comes after them, in new-token order. BPE applies the lowest-ranked pair first,
so every old merge runs before any new one: text in which no new pair occurs after the old
merges keeps its old ids.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil

from megatron_ct.expansion.vocab.bytelevel import from_byte_level, is_byte_level
from megatron_ct.expansion.vocab.select import MergeResult, Segmenter, choose_new_pieces

# Per new token, the pairs of strings that make it, in the order to list their merges.
Splits = dict[str, list[tuple[str, str]]]

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
            raise ValueError(f"{path}: model.{key}={model[key]!r}; expected none (metaspace or byte-level BPE)")
    parts = {k: "ByteLevel" in json.dumps(tj.get(k)) for k in ("normalizer", "pre_tokenizer", "decoder")}
    if any(parts.values()) and not is_byte_level(tj):
        raise ValueError(
            f"{path}: ByteLevel appears only in {', '.join(k for k, v in parts.items() if v)}; expected a "
            "byte-level BPE (ByteLevel pre-tokenizer and decoder) or the LLaMA metaspace layout ('▁' for spaces)"
        )
    if is_byte_level(tj) and model.get("byte_fallback"):
        raise ValueError(f"{path}: model.byte_fallback=true in a byte-level BPE; expected false")
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


def _vocab_with_added(tj: dict) -> dict[str, int]:
    """The model vocab plus every added token it lacks, at the added token's id.

    The tokenizers library numbers added tokens that are not in the model vocab after the
    vocab (``len(vocab) + k``) whatever ids the file gives them. Tokens appended to the vocab
    would then push such tokens (SmolLM2's FIM tokens, Llama 3's 256 specials) to new ids, so
    they are written into the vocab at their ids first; BPE never produces them (no merge
    builds them), and the added-token pass still matches them as before.
    """
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    for t in tj.get("added_tokens", []):
        vocab.setdefault(t["content"], t["id"])
    return vocab


def _next_id(tj: dict) -> int:
    ids = list(tj["model"]["vocab"].values()) + [t["id"] for t in tj.get("added_tokens", [])]
    return max(ids) + 1


def append_tokens(tj: dict, pieces: list[str], splits: Splits | None = None) -> dict:
    """Copy of ``tj`` with ``pieces`` appended to the vocab and the merges that build them.

    ``splits``: byte-level only, the pairs that make each piece (from training), listed
    before its other splits.
    """
    if is_byte_level(tj):
        return _append_byte_level(tj, pieces, splits or {})
    vocab = _vocab_with_added(tj)
    old = dict(tj["model"]["vocab"])
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


def _append_byte_level(tj: dict, pieces: list[str], splits: Splits) -> dict:
    for piece in pieces:
        from_byte_level(piece)  # ValueError naming the piece if it is not a byte string
    vocab = _vocab_with_added(tj)
    start = _next_id(tj)
    for i, piece in enumerate(pieces):
        vocab[piece] = start + i
    old_merges = tj["model"]["merges"]
    known = {_pair(m) for m in old_merges}
    added: list[tuple[str, str]] = []
    for piece in pieces:
        trained = [p for p in splits.get(piece, []) if p[0] + p[1] == piece]
        other = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        for left, right in dict.fromkeys(trained + other):
            if left in vocab and right in vocab and (left, right) not in known:
                known.add((left, right))
                added.append((left, right))
    as_strings = bool(old_merges) and isinstance(old_merges[0], str)
    merges = list(old_merges) + [f"{a} {b}" if as_strings else [a, b] for a, b in added]
    return {**tj, "model": {**tj["model"], "vocab": vocab, "merges": merges}}


def merge_hf(
    tj: dict,
    candidates: list[str],
    *,
    max_new: int | None = None,
    protect: list[str] = (),
    splits: Splits | None = None,
) -> tuple[dict, MergeResult]:
    """Merge candidate pieces into a ``tokenizer.json`` dict; same rules as ``merge_sp``.

    Pieces, ``protect`` strings and ``splits`` are spelled as the vocabulary is (``'▁'`` for
    a space, or byte-level strings).
    """
    vocab = tj["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in tj.get("added_tokens", [])}
    pieces = choose_new_pieces(
        candidates,
        taken,
        max_new=max_new,
        protect=protect,
        segment_base=segmenter(tj),
        segmenter_for=lambda chosen: segmenter(append_tokens(tj, chosen, splits)),
    )
    return append_tokens(tj, pieces, splits), MergeResult(new_pieces=pieces, first_new_id=_next_id(tj))


def merge_hf_dir(
    base_dir: str | os.PathLike, candidates: list[str], out_dir: str | os.PathLike, **kwargs
) -> MergeResult:
    """:func:`merge_hf` on a tokenizer directory, written to ``out_dir``.

    The other tokenizer files (``tokenizer_config.json``, ``special_tokens_map.json``,
    ``added_tokens.json``, chat templates) are copied; a ``tokenizer.model`` next to
    ``tokenizer.json`` is merged with the same pieces (``merge_sp``), so the two files keep
    agreeing (metaspace layout only). The output is checked to load with
    :func:`megatron_ct.tokenizer.load_tokenizer`, whose self-check runs ``transformers`` too.
    """
    base_dir, out_dir = os.fspath(base_dir), os.fspath(out_dir)
    path = os.path.join(base_dir, TOKENIZER_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; expected a Hugging Face tokenizer directory with tokenizer.json")
    base = load_tokenizer_json(path)
    merged, result = merge_hf(base, candidates, **kwargs)
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

    written = Tokenizer.from_str(json.dumps(merged, ensure_ascii=False))
    _check_old_ids(Tokenizer.from_str(json.dumps(base)), written, path)
    written.save(os.path.join(out_dir, TOKENIZER_JSON))
    sp_path = os.path.join(base_dir, "tokenizer.model")
    if os.path.isfile(sp_path) and not is_byte_level(base):
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


def _check_old_ids(base, merged, path: str) -> None:
    """Every id of the base tokenizer (vocab and added tokens) names the same token after the merge."""
    n = base.get_vocab_size(with_added_tokens=True)
    moved = [i for i in range(n) if base.id_to_token(i) != merged.id_to_token(i)]
    if moved:
        raise RuntimeError(f"{path}: merging moved ids {moved[:5]} (e.g. {base.id_to_token(moved[0])!r})")


def _check_loads(out_dir: str, result: MergeResult) -> None:
    """The output loads with megatron-ct's loader, whose self-check also runs transformers'
    ``AutoTokenizer`` (and SentencePiece on a ``tokenizer.model``) on it."""
    from megatron_ct.tokenizer import load_tokenizer

    tok = load_tokenizer(out_dir)
    if tok.vocab_size != result.vocab_size:
        raise RuntimeError(f"{out_dir}: the merged tokenizer loads {tok.vocab_size} ids, expected {result.vocab_size}")
