"""The MLP's SwiGLU module (megatron_ct/model/swiglu.py): megatron-core's unfused SwiGLU, bit for
bit, without its ``+ glu_linear_offset`` copy and its concatenated backward; and the CPU model
that uses it (with the CPU RoPE kernel) computes what megatron-core's unfused paths compute."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ct.model.swiglu import SwiGLU


def megatron_unfused_swiglu(x: torch.Tensor) -> torch.Tensor:
    """What megatron-core's MLP computes without a fused kernel (glu_linear_offset 0)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * (up + 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_are_bit_identical_to_megatron_cores(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(48, 2, 2 * 96, generator=g) * 3).to(dtype)  # [s, b, 2 * ffn/tp]: gate | up
    upstream = torch.randn(48, 2, 96, generator=g).to(dtype)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = SwiGLU()(ours), megatron_unfused_swiglu(ref)
    out.backward(upstream)
    expected.backward(upstream)
    assert torch.equal(out, expected)
    assert torch.equal(ours.grad, ref.grad)
    assert ours.grad.abs().sum() > 0


@pytest.mark.parametrize("field,value", [("glu_linear_offset", 1.0), ("activation_func_clamp_value", 7.0)])
def test_refuses_configs_it_does_not_compute(field, value):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=f"SwiGLU: .*{field}={value}"):
        SwiGLU(SimpleNamespace(**{field: value}))


def test_cpu_model_equals_megatron_cores_unfused_paths(mcore_tp1, seeded):
    """The model built for CPU (our SwiGLU, our fused-RoPE kernel) gives the loss and every
    gradient of megatron-core's unfused SwiGLU and RoPE, bit for bit."""
    from megatron.core import tensor_parallel

    from megatron_ct.config import load_config, validate_for_world
    from megatron_ct.model.llama import build_model
    from megatron_ct.model.rope import _CpuRope
    from megatron_ct.model.swiglu import SwiGLU
    from megatron_ct.parallel.device import activate_cpu_device_layer, deactivate_cpu_device_layer

    activate_cpu_device_layer()  # megatron-core's rotary module places its table on the "current CUDA device"
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        cfg = load_config(
            None,
            [
                "model.num_layers=2",
                "model.hidden_size=64",
                "model.num_attention_heads=4",
                "model.num_query_groups=2",
                "model.ffn_hidden_size=96",
                "model.vocab_size=200",
                "parallel.device=cpu",
            ],
        )
        model = build_model(cfg.model, validate_for_world(cfg, 1))[0][0]
        config = model.config
        assert config.use_te_activation_func and config.apply_rope_fusion  # what CPU models run
        assert isinstance(model.decoder.layers[0].mlp.activation_func, SwiGLU)
        from megatron.core.models.common.embeddings import rope_utils

        assert isinstance(rope_utils.fused_apply_rotary_pos_emb, _CpuRope)

        tokens = torch.randint(0, 200, (2, 33))
        positions = torch.arange(32).expand(2, -1)

        def loss_and_grads(ours: bool):
            config.use_te_activation_func = config.apply_rope_fusion = ours  # read at every forward
            model.zero_grad(set_to_none=True)
            loss = model(tokens[:, :-1], positions, attention_mask=None, labels=tokens[:, 1:]).sum()
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

        ours = loss_and_grads(True)
        theirs = loss_and_grads(False)
    finally:
        deactivate_cpu_device_layer()
    assert torch.equal(ours[0], theirs[0])
    assert ours[1].keys() == theirs[1].keys()
    for name in ours[1]:
        assert torch.equal(ours[1][name], theirs[1][name]), name
