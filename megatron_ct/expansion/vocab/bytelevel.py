"""Byte-level BPE (GPT-2, Llama 3, Qwen2/2.5/3, SmolLM, Mistral-Nemo): pieces and new merges.

In a byte-level ``tokenizer.json`` the text of each pre-token (a word, a run of CJK, a group
of digits; split by the ``ByteLevel`` pre-tokenizer's regex or a ``Split`` before it) is
turned into UTF-8 bytes, every byte spelled as one printable character (GPT-2's byte
alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes for U+0100..), and
BPE merges those characters. Vocabulary strings are therefore byte strings in that alphabet:
``'Ġ'`` is a space, ``'è¿Ļ'`` is the three bytes of ``这``; a token may even end inside a
character.

Candidate pieces come from training on the domain text **on top of the base tokenization**:
each pre-token is first segmented by the base model, every base token becomes one symbol,
and the tokenizers library's BPE trainer learns merges of adjacent base tokens. Appended
after all old merges, each learned merge then applies exactly where training saw it (every
old merge has already run), so new tokens are reachable by construction, and text in which
no learned pair occurs keeps its old ids. A SentencePiece model can be a source too; its
pieces are re-spelled as byte strings (:func:`pieces_from_text`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from megatron_ct.errors import DataError

log = logging.getLogger(__name__)


def _byte_alphabet() -> list[str]:
    """Character for each byte value 0..255 in GPT-2's byte-level alphabet (a format fact)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


BYTE_CHARS = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_CHARS)}


def to_byte_level(text: str) -> str:
    """``' 酒店'`` -> ``'ĠéħĴåºĹ'``: the byte-level spelling of ``text``'s UTF-8 bytes."""
    return "".join(BYTE_CHARS[b] for b in text.encode("utf-8"))


def from_byte_level(piece: str) -> bytes:
    """Inverse of :func:`to_byte_level` (bytes: a piece may end inside a character)."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in piece)
    except KeyError as exc:
        raise ValueError(f"{piece!r} is not a byte-level string (character {exc.args[0]!r})") from None


def _has_byte_level(component) -> bool:
    return "ByteLevel" in json.dumps(component)


def is_byte_level(tj: dict) -> bool:
    """A byte-level ``tokenizer.json``: ByteLevel pre-tokenizer (alone or in a Sequence) and decoder."""
    return _has_byte_level(tj.get("pre_tokenizer")) and _has_byte_level(tj.get("decoder"))


def _tokenizer(tj: dict):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(tj))


def pieces_from_text(tj: dict, texts: Iterable[str]) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """Byte-level candidates (and their splits) from text pieces, e.g. SentencePiece pieces.

    Each text (``'▁'`` read as a space) is normalised as the base does; texts the base
    pre-tokenizer would cut into several pre-tokens are dropped (BPE never merges across
    pre-tokens, so they could never occur). A piece is only reachable if the tokens it is
    made of are, so each is preceded by the steps that build it from the base segmentation:
    every character from its base tokens, then the piece from its characters, left to right
    (``'这家'``: the bytes of ``这``, of ``家``, then ``这`` + ``家``). Order is kept (it is the
    merge priority), duplicates dropped.
    """
    tok = _tokenizer(tj)
    model = tok.model
    taken = set(tj["model"]["vocab"]) | {t["content"] for t in tj.get("added_tokens", [])}
    pieces: list[str] = []
    splits: dict[str, list[tuple[str, str]]] = {}

    def add(left: str, right: str) -> str:
        joined = left + right
        if joined not in taken and joined not in splits:
            pieces.append(joined)
            splits[joined] = [(left, right)]
        return joined

    def build(tokens: list[str]) -> str:
        acc = tokens[0]
        for t in tokens[1:]:
            acc = add(acc, t)
        return acc

    for text in texts:
        text = text.replace("▁", " ")
        if not text:
            continue
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        pre = tok.pre_tokenizer.pre_tokenize_str(text) if tok.pre_tokenizer is not None else [(text, None)]
        if len(pre) != 1 or pre[0][0] != to_byte_level(text):
            continue
        chars = [build([t.value for t in model.tokenize(to_byte_level(c))]) for c in text]
        build(chars)
    return pieces, splits


# Supplementary Private Use Areas A and B: one code point per base token that occurs in the
# training text, so the BPE trainer sees each base token as one character.
_SYMBOL_RANGES = ((0xF0000, 0xFFFFE), (0x100000, 0x10FFFE))
_MAX_SYMBOLS = sum(hi - lo for lo, hi in _SYMBOL_RANGES)


def _symbol(k: int) -> str:
    for lo, hi in _SYMBOL_RANGES:
        if k < hi - lo:
            return chr(lo + k)
        k -= hi - lo
    raise DataError(f"byte-level training: more than {_MAX_SYMBOLS} distinct base tokens in the training text")


def train_on_base_tokens(
    tj: dict, lines: Iterable[str], num_merges: int, min_frequency: int = 2, batch: int = 1000
) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """Learn up to ``num_merges`` merges of base tokens on ``lines`` (one document each).

    Returns the learned tokens as byte-level strings in merge order (the candidates, highest
    priority first) and, per token, the pairs of byte-level strings the trainer joined to make
    it (usually one; two symbol sequences can spell the same bytes). Merges that only rebuild
    a token the base already has are not candidates.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base = _tokenizer(tj)
    base.encode_special_tokens = True  # special-token text in the corpus is plain text
    base.no_truncation()
    base.no_padding()
    added_ids = {t["id"] for t in tj.get("added_tokens", [])}
    symbol_of: dict[int, str] = {}
    text_of: dict[str, str] = {}  # symbol -> byte-level string of its base token

    def words(chunk: list[str]) -> Iterable[str]:
        """Each line as its pre-tokens, each pre-token as one symbol per base token."""
        for enc in base.encode_batch(chunk, add_special_tokens=False):
            out, current, last = [], [], None
            for token_id, token, word in zip(enc.ids, enc.tokens, enc.word_ids, strict=True):
                if (word != last or token_id in added_ids) and current:
                    out.append("".join(current))
                    current = []
                last = word
                if token_id in added_ids:  # cut out before BPE: never part of a merge
                    continue
                sym = symbol_of.get(token_id)
                if sym is None:
                    sym = symbol_of[token_id] = _symbol(len(symbol_of))
                    text_of[sym] = token
                current.append(sym)
            if current:
                out.append("".join(current))
            yield " ".join(out)

    def corpus() -> Iterable[str]:
        chunk: list[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) == batch:
                yield from words(chunk)
                chunk = []
        if chunk:
            yield from words(chunk)

    # Held in memory (one symbol per base token, about half the text's UTF-8 size): the
    # trainer needs its whole alphabet, known only after every line is segmented.
    docs = list(corpus())
    if not docs:
        raise DataError("byte-level training: the training text has no documents")
    alphabet = list(text_of)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + num_merges,
        min_frequency=min_frequency,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
        special_tokens=[],
    )
    trainer_tok.train_from_iterator(docs, trainer=trainer)
    merges = json.loads(trainer_tok.to_str())["model"]["merges"]
    taken = set(tj["model"]["vocab"]) | {t["content"] for t in tj.get("added_tokens", [])}

    def spell(symbols: str) -> str:
        return "".join(text_of[s] for s in symbols)

    pieces: list[str] = []
    splits: dict[str, list[tuple[str, str]]] = {}
    for merge in merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        piece, pair = spell(left + right), (spell(left), spell(right))
        if piece in taken:
            continue
        if piece not in splits:
            pieces.append(piece)
            splits[piece] = []
        if pair not in splits[piece]:
            splits[piece].append(pair)
    log.info(
        "byte-level training: %d base tokens seen, %d merges learned, %d new tokens",
        len(alphabet),
        len(merges),
        len(pieces),
    )
    return pieces, splits
