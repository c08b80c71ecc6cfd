import pytest

from megatron_ct.model.llama import choose_transformer_impl, padded_vocab_size


@pytest.mark.parametrize(
    "vocab, div, tp, expected",
    [(32000, 128, 1, 32000), (32000, 128, 8, 32768), (500, 128, 2, 512), (151936, 128, 4, 152064), (1, 128, 1, 128)],
)
def test_padded_vocab_is_a_multiple_of_divisor_times_tp(vocab, div, tp, expected):
    assert padded_vocab_size(vocab, div, tp) == expected


def test_layer_spec_choice_without_transformer_engine():
    assert choose_transformer_impl("auto", "cpu") == "local"
    assert choose_transformer_impl("local", "cuda") == "local"
    with pytest.raises(ValueError, match="model.transformer_impl: 'transformer_engine' needs a CUDA device"):
        choose_transformer_impl("transformer_engine", "cpu")
