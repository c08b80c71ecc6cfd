import pytest
import torch

from megatron_ct.config import load_config
from megatron_ct.errors import ConfigError
from megatron_ct.model.llama import choose_transformer_impl, padded_vocab_size
from megatron_ct.training.startup import resolve_layout


@pytest.mark.parametrize(
    "vocab, div, tp, expected",
    [(32000, 128, 1, 32000), (32000, 128, 8, 32768), (500, 128, 2, 512), (151936, 128, 4, 152064), (1, 128, 1, 128)],
)
def test_padded_vocab_is_a_multiple_of_divisor_times_tp(vocab, div, tp, expected):
    assert padded_vocab_size(vocab, div, tp) == expected


def test_layer_spec_choice_without_transformer_engine():
    assert choose_transformer_impl("auto", torch.device("cpu")) == "local"
    assert choose_transformer_impl("local", torch.device("cuda")) == "local"
    cfg = load_config(None, ["model.transformer_impl=transformer_engine", "parallel.device=cpu"])
    with pytest.raises(ConfigError, match="model.transformer_impl: expected local or auto .*needs a CUDA device"):
        resolve_layout(cfg, 1, 0)
