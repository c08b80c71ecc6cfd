"""load_tokenizer: both backends agree with SentencePiece and fail with clear messages."""

from __future__ import annotations

import pytest

pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")

from material import build_hf_llama_tokenizer, llama_sp_model_path  # noqa: E402

from megatron_ct.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

# Mixed scripts, repeated spaces, newlines, tabs, emoji (byte fallback), full-width forms.
SAMPLES = [
    "Hello world.",
    "中文，标点。还有English混排",
    "two  spaces\nnew line\ttab",
    "emoji 🦙 and ＦＵＬＬ width",
]
EXPECTED_EXPECTATION = "expected a SentencePiece .model file or a Hugging Face tokenizer directory"


@pytest.fixture(scope="module")
def sp() -> Tokenizer:
    return load_tokenizer(llama_sp_model_path())


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(build_hf_llama_tokenizer(tmp_path_factory.mktemp("hf_tokenizer")))


def test_sentencepiece_special_ids_and_round_trip(sp):
    assert (sp.vocab_size, sp.eod_id, sp.bos_id, sp.pad_id) == (32000, 2, 1, None)
    assert sp.name.startswith("sentencepiece:") and sp.name.endswith("tokenizer.model.v1")
    for text in SAMPLES + [" leading space", "trailing space "]:
        ids = sp.encode(text)
        assert ids and sp.bos_id not in ids and sp.eod_id not in ids  # no specials added
        assert sp.decode(ids) == text
        assert sp.decode(ids + [sp.eod_id]) == text  # control ids render as nothing
    assert sp.encode_batch(SAMPLES) == [sp.encode(t) for t in SAMPLES]


def test_hf_directory_matches_sentencepiece(hf, sp):
    assert (hf.vocab_size, hf.eod_id, hf.bos_id, hf.pad_id) == (32000, 2, 1, None)
    assert hf.name.startswith("hf:")
    for text in SAMPLES:
        assert hf.decode(hf.encode(text)) == text
        assert hf.decode(hf.encode(text) + [hf.eod_id]) == text
    assert hf.encode_batch(SAMPLES) == [hf.encode(t) for t in SAMPLES]
    # Same model, same ids (HF's Llama pre-tokenizer may split runs of spaces differently).
    assert hf.encode(SAMPLES[0]) == sp.encode(SAMPLES[0])
    assert hf.encode(SAMPLES[1]) == sp.encode(SAMPLES[1])


@pytest.mark.parametrize("backend", ["sp", "hf"])
def test_special_token_text_stays_plain_text(backend, sp, hf):
    tok = sp if backend == "sp" else hf
    text = "quoted </s> and <s> and <unk> markers"
    ids = tok.encode(text)
    assert {tok.eod_id, tok.bos_id, 0}.isdisjoint(ids)  # no forged document boundary
    assert ids == sp.encode(text) and tok.decode(ids) == text
    assert tok.encode_batch([text]) == [ids]


def test_missing_path_names_path_and_expectation(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=str(missing)) as info:
        load_tokenizer(missing)
    assert EXPECTED_EXPECTATION in str(info.value) and "\n" not in str(info.value)


def _unrecognised(kind: str, d):
    """A path of the given kind that exists but is no tokenizer."""
    if kind == "garbage-file":
        (d / "garbage.model").write_bytes(b"not a model")
        return d / "garbage.model"
    if kind == "json-file":
        (d / "tokenizer.json").write_text("{}")
        return d / "tokenizer.json"
    return d  # empty directory


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("garbage-file", "is not a SentencePiece model file"),
        ("empty-dir", "has none of tokenizer.json"),
        ("json-file", "is a JSON file"),
    ],
)
def test_unrecognised_path_is_one_line_value_error(tmp_path, kind, fragment):
    path = _unrecognised(kind, tmp_path)
    with pytest.raises(ValueError) as info:
        load_tokenizer(path)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_broken_hf_directory_is_one_line_value_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a loadable Hugging Face tokenizer directory") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
