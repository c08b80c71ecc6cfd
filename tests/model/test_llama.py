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


def test_gpu_config_takes_megatron_cores_fused_swiglu():
    """On GPU the MLP runs megatron-core's fused SwiGLU (torch.compile'd, input-only saved for
    the backward), no TE or apex needed: bias_activation_fusion with gated silu selects it."""
    import torch.nn.functional as F

    from megatron_ct.config import load_config, validate_for_world
    from megatron_ct.model.llama import Numerics, transformer_config

    cfg = load_config(None, [])
    gpu, cpu = (
        transformer_config(cfg.model, validate_for_world(cfg, 1, torch.device(d)), Numerics()) for d in ("cuda", "cpu")
    )
    assert gpu.bias_activation_fusion and gpu.gated_linear_unit and gpu.activation_func is F.silu
    assert not cpu.bias_activation_fusion  # CPU: the unfused path, same formula
    # CPU only: our SwiGLU module and RoPE kernel (tests/model/test_swiglu.py); never on GPU.
    assert cpu.use_te_activation_func and cpu.apply_rope_fusion
    assert not gpu.use_te_activation_func and not gpu.apply_rope_fusion


@pytest.mark.slow  # torch.compile of forward and backward: ~15 s on 2 cores
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_equals_eager(dtype):
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    g = torch.Generator().manual_seed(0)
    y = (torch.randn(32, 2, 2 * 96, generator=g) * 3).to(dtype)  # [s, b, 2 * ffn/tp]: gate | up
    upstream = torch.randn(32, 2, 96, generator=g).to(dtype)
    out, grads = {}, {}
    for name in ("eager", "fused"):
        yi = y.clone().requires_grad_()
        if name == "eager":
            gate, up = torch.chunk(yi, 2, -1)
            out[name] = torch.nn.functional.silu(gate) * up
        else:
            try:
                out[name] = bias_swiglu_impl(yi, None)
            except Exception as e:  # torch.compile needs a C++ compiler on CPU
                pytest.skip(f"torch.compile cannot run here: {type(e).__name__}: {str(e)[:200]}")
        out[name].backward(upstream)
        grads[name] = yi.grad
    u = torch.finfo(dtype).eps
    torch.testing.assert_close(out["fused"], out["eager"], rtol=2 * u, atol=2 * u)
    scale = grads["eager"].abs().max().item()
    torch.testing.assert_close(grads["fused"], grads["eager"], rtol=4 * u, atol=4 * u * scale)
