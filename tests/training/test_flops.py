from megatron_ct.config import load_config
from megatron_ct.families import family_of
from megatron_ct.training.flops import peak_tflops_for


def test_llama7b_flops_per_token_close_to_6n():
    m = load_config(
        None,
        [
            "model.num_layers=32",
            "model.hidden_size=4096",
            "model.num_attention_heads=32",
            "model.vocab_size=32000",
            "model.max_position_embeddings=4096",
        ],
    ).model
    n_params = 6.74e9
    f = family_of(m).flops_per_token(m, 4096, 32000)
    # 6N for the weights plus the attention term 12*L*h*s (about 6.4e9 at s=4096).
    assert 6 * n_params < f < 6 * n_params + 12 * 32 * 4096 * 4096 * 1.1


def test_peak_table():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("Some CPU") is None
