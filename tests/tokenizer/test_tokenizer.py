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


# --- tokenizer.json read as written, special ids from the model, the self-check -------------

PROBE_TEXTS = ["Hello  world, 这家酒店的服务很好 2024", "two words", "中文"]


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> str:
    """SmolLM2-like: byte-level BPE, specials at ids 0-2, FIM tokens after the vocabulary."""
    from material import build_byte_level_tokenizer

    return build_byte_level_tokenizer(tmp_path_factory.mktemp("byte_level"))


def _copy(src: str, dst, **replace_json) -> str:
    import json
    import shutil

    shutil.copytree(src, dst)
    for name, update in replace_json.items():
        path = dst / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(update)
        path.write_text(json.dumps(data))
    return str(dst)


def test_misleading_tokenizer_class_is_refused_in_one_line(byte_level, tmp_path):
    from megatron_ct.errors import DataError

    # SmolLM2's tokenizer_config.json names CodeLlamaTokenizer: transformers 5 then drops the
    # byte-level pre-tokenizer (spaces vanish, Chinese becomes the unknown id).
    bad = _copy(byte_level, tmp_path / "bad", tokenizer_config={"tokenizer_class": "CodeLlamaTokenizer"})
    with pytest.raises(DataError) as info:
        load_tokenizer(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}/tokenizer_config.json: tokenizer_class 'CodeLlamaTokenizer'")
    assert "set it to PreTrainedTokenizerFast" in message and "\n" not in message

    # tokenizer.json itself is read right: spaces, Chinese, the file's own ids.
    tok = load_tokenizer(bad, self_check=False)
    good = load_tokenizer(byte_level)
    for text in PROBE_TEXTS:
        assert tok.encode(text) == good.encode(text) and tok.decode(tok.encode(text)) == text
    assert (tok.eod_id, tok.bos_id, tok.pad_id) == (0, 0, None)  # <|endoftext|>, from tokenizer_config.json


def test_byte_level_directory_matches_transformers_and_counts_ids(byte_level):
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(byte_level)
    fast = PreTrainedTokenizerFast(tokenizer_file=f"{byte_level}/tokenizer.json")
    assert tok.name == f"hf:{byte_level} (tokenizer.json)"
    for text in SAMPLES + PROBE_TEXTS + ["quoted <|endoftext|> and <fim_prefix> markers"]:
        ids = tok.encode(text)
        assert ids == fast(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text and tok.decode([tok.eod_id, *ids]) == text
        assert tok.eod_id not in ids and max(ids) < 2000  # special text stays text
    assert tok.encode_batch(PROBE_TEXTS) == [tok.encode(t) for t in PROBE_TEXTS]
    # 2000 BPE ids + 3 FIM tokens after them: data only ever holds the first 2000.
    assert (tok.vocab_size, tok.data_vocab_size) == (2003, 2000)


def test_special_ids_come_from_the_model_files_first(byte_level, tmp_path):
    from megatron_ct.errors import DataError

    # config.json wins over tokenizer_config.json; generation_config.json fills what it lacks.
    d = _copy(
        byte_level,
        tmp_path / "model",
        config={"eos_token_id": [2, 0], "bos_token_id": 1},
        generation_config={"pad_token_id": 2, "eos_token_id": 0},
    )
    tok = load_tokenizer(d)
    assert (tok.eod_id, tok.bos_id, tok.pad_id) == (2, 1, 2)
    assert tok.special_sources == {"eos": "config.json", "bos": "config.json", "pad": "generation_config.json"}

    bad = _copy(byte_level, tmp_path / "bad_id", config={"eos_token_id": 5000})
    with pytest.raises(DataError, match=r"config.json: eos_token_id=5000 is not an id of the tokenizer; expected"):
        load_tokenizer(bad)
    missing = _copy(byte_level, tmp_path / "bad_token", tokenizer_config={"eos_token": "</s>"})
    with pytest.raises(DataError, match=r"tokenizer_config.json: eos_token '</s>' is not a token of the tokenizer"):
        load_tokenizer(missing)


def test_sentencepiece_file_that_disagrees_with_tokenizer_json_is_refused(byte_level, tmp_path):
    import shutil

    from megatron_ct.errors import DataError

    d = _copy(byte_level, tmp_path / "mixed")
    shutil.copyfile(llama_sp_model_path(), f"{d}/tokenizer.model")
    with pytest.raises(DataError) as info:
        load_tokenizer(d)
    assert str(info.value).startswith(f"{d}/tokenizer.model: SentencePiece encodes the probe text")
    assert "expected the two files of one tokenizer" in str(info.value) and "\n" not in str(info.value)


def test_sentencepiece_directory_and_agreeing_files_load(hf, tmp_path):
    import shutil

    # tokenizer.json + tokenizer.model of one tokenizer: both checks pass.
    d = tmp_path / "both"
    shutil.copytree(hf.name.removeprefix("hf:").removesuffix(" (tokenizer.json)"), d)
    shutil.copyfile(llama_sp_model_path(), d / "tokenizer.model")
    assert load_tokenizer(d).encode(SAMPLES[1]) == load_tokenizer(llama_sp_model_path()).encode(SAMPLES[1])
    # Only tokenizer.model (and its config): read with SentencePiece.
    (d / "tokenizer.json").unlink()
    tok = load_tokenizer(d)
    assert tok.name.startswith("sentencepiece:") and (tok.vocab_size, tok.eod_id, tok.bos_id) == (32000, 2, 1)


def test_trainer_accepts_added_special_tokens_past_the_embedding(byte_level):
    from megatron_ct.config import ConfigError, CTConfig, DataConfig, ModelConfig
    from megatron_ct.training.startup import _load_data_tokenizer

    def config(vocab: int) -> CTConfig:
        data = DataConfig(datasets={"a": "a_text_document"}, stages=[{"name": "s", "blend": {"a": 1.0}}])
        data.tokenizer = byte_level
        return CTConfig(model=ModelConfig(vocab_size=vocab), data=data)

    _load_data_tokenizer(config(2000))  # 2003 ids, but the FIM tokens never occur in data
    with pytest.raises(ConfigError, match="data.tokenizer: expected at most model.vocab_size=1999 ids"):
        _load_data_tokenizer(config(1999))
