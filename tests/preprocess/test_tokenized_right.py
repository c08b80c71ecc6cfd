"""Preprocessing writes the ids the model was trained with, or nothing.

SmolLM2's case, rebuilt small: a byte-level BPE ``tokenizer.json`` (``<|endoftext|>``,
``<|im_start|>``, ``<|im_end|>`` = 0, 1, 2) next to a ``tokenizer_config.json`` whose EOS is
``<|endoftext|>`` while the model's ``config.json`` says ``eos_token_id=2``. The written ids must
be the ``tokenizer.json`` ids (tokenizers library) and EOD the model's EOS. When
``tokenizer_config.json`` names ``CodeLlamaTokenizer`` (transformers then drops the byte-level
pre-tokenizer: spaces vanish, Chinese becomes the unknown id; 41% unknown ids on a real zh/en
corpus), the tokenizer loader's self-check refuses the directory: one line, nothing written.
"""

from __future__ import annotations

import json
import os

import pytest

from megatron_ct.data.indexed import open_indexed
from megatron_ct.preprocess.pipeline import PreprocessConfig, PreprocessError, output_prefixes, preprocess

TEXTS = [
    "Hello world, this is English text about hotels and services.",
    "这家酒店的服务很好，我们下次还会再来。",
    "def f(x):\n    return x + 1",
    "Mixed 中英 text, 两种 languages.",
]


def build_smollm2_style_dir(directory, tokenizer_class: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],  # ids 0, 1, 2 as in SmolLM2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = {"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2, "vocab_size": tok.get_vocab_size()}
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def preprocess_texts(tmp_path, directory) -> tuple[dict, str]:
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    cfg = PreprocessConfig(
        inputs=[str(src)], output_prefix=str(tmp_path / "out" / "c"), tokenizer=directory, progress=False
    )
    return preprocess(cfg), output_prefixes(cfg)["text"]


def test_tokenizer_json_ids_and_the_model_eos_are_written(tmp_path):
    from tokenizers import Tokenizer

    directory = build_smollm2_style_dir(tmp_path / "smollm2_style", "PreTrainedTokenizerFast")
    summary, prefix = preprocess_texts(tmp_path, directory)
    reference = Tokenizer.from_file(f"{directory}/tokenizer.json")
    expected = [reference.encode(t, add_special_tokens=False).ids + [2] for t in TEXTS]
    data = open_indexed(prefix)
    assert [data.get(i).tolist() for i in range(len(data))] == expected
    assert summary["eod_id"] == 2 and data.meta.tokenizer["eod_id"] == 2
    assert 0 not in [t for ids in expected for t in ids]  # no unknown (or <|endoftext|>) id anywhere


def test_codellama_class_in_tokenizer_config_is_refused_before_anything_is_written(tmp_path):
    directory = build_smollm2_style_dir(tmp_path / "smollm2_style", "CodeLlamaTokenizer")
    with pytest.raises(PreprocessError) as err:
        preprocess_texts(tmp_path, directory)
    message = str(err.value)
    assert message.startswith(f"{directory}/tokenizer_config.json: tokenizer_class 'CodeLlamaTokenizer'")
    assert "\n" not in message
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
