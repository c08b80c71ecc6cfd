"""RoPE parity with Hugging Face: cos/sin tables, and q/k as rotated inside a megatron-core GPTModel."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from megatron_ct.model.rope import (
    HFRotaryEmbedding,
    RopeScaling,
    compute_cos_sin,
    compute_inv_freq_and_attention_factor,
    install_rope,
)

HEAD_DIM = 16
BASE = 10000.0
MAX_POS = 64  # "max_position_embeddings"; sequences of 96 exercise the extended range

# (name, HF rope_scaling dict). YaRN/llama3 keep max_pos / original == factor so HF does not warn.
CASES = [
    ("default", None),
    ("linear", {"rope_type": "linear", "factor": 4.0}),
    ("dynamic", {"rope_type": "dynamic", "factor": 2.0}),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    (
        "yarn_deepseek",
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
            "beta_fast": 16,
            "beta_slow": 2,
        },
    ),
    (
        "yarn_explicit",
        {
            "type": "yarn",  # legacy key
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "attention_factor": 1.3,
            "truncate": False,
        },
    ),
    (
        "llama3",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
]
IDS = [c[0] for c in CASES]


def hf_rotary(rope_scaling):
    """HF's LlamaRotaryEmbedding for our tiny head size and the given rope_scaling."""
    params = dict(rope_scaling or {"rope_type": "default"})
    params["rope_theta"] = BASE
    config = LlamaConfig(
        hidden_size=2 * HEAD_DIM,
        num_attention_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        rope_parameters=params,
    )
    return LlamaRotaryEmbedding(config)


def hf_cos_sin(rope_scaling, seq_len, dtype=torch.float32):
    """HF cos/sin [s, head_dim] for positions 0..seq_len-1 (batch of 1)."""
    cos, sin = hf_rotary(rope_scaling)(torch.zeros(1, dtype=dtype), torch.arange(seq_len)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("name,rope_scaling", CASES, ids=IDS)
@pytest.mark.parametrize("seq_len", [48, 96])
def test_cos_sin_match_transformers(name, rope_scaling, seq_len):
    scaling = RopeScaling.from_hf_dict(rope_scaling)
    cos, sin = compute_cos_sin(HEAD_DIM, BASE, scaling, MAX_POS, seq_len)
    ref_cos, ref_sin = hf_cos_sin(rope_scaling, seq_len)
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)


def test_scaling_types_are_not_trivial():
    # Guards the parity test against comparing defaults with defaults.
    default_inv, _ = compute_inv_freq_and_attention_factor(HEAD_DIM, BASE, RopeScaling(), MAX_POS)
    for name, rope_scaling in CASES[1:]:
        inv, factor = compute_inv_freq_and_attention_factor(
            HEAD_DIM, BASE, RopeScaling.from_hf_dict(rope_scaling), MAX_POS, seq_len=96
        )
        assert not torch.equal(inv, default_inv), name
        assert (factor != 1.0) == name.startswith("yarn"), name


@pytest.mark.parametrize("name,rope_scaling", CASES, ids=IDS)
def test_hf_dict_round_trip(name, rope_scaling):
    scaling = RopeScaling.from_hf_dict(rope_scaling)
    assert RopeScaling.from_hf_dict(scaling.to_hf_dict()) == scaling
    expected = {k: v for k, v in (rope_scaling or {"rope_type": "default"}).items() if k != "type"}
    expected.setdefault("rope_type", (rope_scaling or {}).get("type", "default"))
    assert scaling.to_hf_dict() == expected


def test_hf5_rope_parameters_accepted():
    d = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5, "partial_rotary_factor": 1.0}
    assert RopeScaling.from_hf_dict(d) == RopeScaling(rope_type="linear", factor=2.0)


@pytest.mark.parametrize(
    "d,key",
    [
        ({"rope_type": "longrope", "factor": 2.0}, "rope_type"),
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "linear", "factor": 0.5}, "factor"),
        ({"rope_type": "linear", "factor": 2.0, "beta_fast": 8}, "beta_fast"),
        ({"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.0}, "attention_factor"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "low_freq_factor"),
        (
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4, "high_freq_factor": 1},
            "high_freq_factor",
        ),
        ({"rope_type": "dynamic", "factor": 2.0, "fator": 2.0}, "fator"),
        ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_validation_names_the_key(d, key):
    with pytest.raises(ValueError, match=f"rope_scaling.{key}") as err:
        RopeScaling.from_hf_dict(d)
    assert "\n" not in str(err.value)


# --- inside a megatron-core GPTModel -------------------------------------------------------------


def tiny_gpt(tp1):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=HEAD_DIM,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=128,
        max_sequence_length=4 * MAX_POS,
        position_embedding_type="rope",
        rotary_base=int(BASE),
    )


class _StopAtCoreAttention(Exception):
    """Raised once RoPE has been applied: the rest of attention is not under test."""


@pytest.mark.parametrize("name,rope_scaling", CASES, ids=IDS)
def test_gpt_model_rotates_q_k_like_hf(name, rope_scaling, mcore_tp1, seeded, monkeypatch):
    import megatron.core.transformer.attention as mcore_attention

    model = tiny_gpt(mcore_tp1)
    scaling = RopeScaling.from_hf_dict(rope_scaling)
    install_rope(model, HEAD_DIM, BASE, scaling, MAX_POS)
    assert isinstance(model.rotary_pos_emb, HFRotaryEmbedding)

    # Record what SelfAttention passes to / gets from megatron-core's apply_rotary_pos_emb.
    calls = []
    real_apply = mcore_attention.apply_rotary_pos_emb

    def recording_apply(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        out = real_apply(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
        calls.append((t.detach(), mscale, out.detach()))
        return out

    def stop(*args, **kwargs):
        raise _StopAtCoreAttention

    monkeypatch.setattr(mcore_attention, "apply_rotary_pos_emb", recording_apply)
    model.decoder.layers[0].self_attention.core_attention.register_forward_pre_hook(stop)

    seq_len, batch = 96, 2
    tokens = torch.randint(0, 128, (batch, seq_len))
    positions = torch.arange(seq_len).expand(batch, -1)
    with pytest.raises(_StopAtCoreAttention):
        model(tokens, positions, attention_mask=None)

    assert len(calls) == 2  # query, then key
    ref_cos, ref_sin = hf_cos_sin(rope_scaling, seq_len)  # [s, d]
    hf_factor = hf_rotary(rope_scaling).attention_scaling
    for t_in, mscale, t_out in calls:
        assert math.isclose(mscale, hf_factor, rel_tol=1e-12)
        # megatron [s, b, n, d] -> HF [b, n, s, d]
        x = t_in.permute(1, 2, 0, 3)
        ref, _ = hf_apply_rotary_pos_emb(x, x, ref_cos[None], ref_sin[None])
        torch.testing.assert_close(t_out.permute(1, 2, 0, 3), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name,rope_scaling", [CASES[4]], ids=[IDS[4]])
def test_bf16_rotation_is_bitwise_hf(name, rope_scaling, mcore_tp1, seeded):
    # In bf16 both sides round cos*factor and sin*factor to bf16 before the same products.
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    model = tiny_gpt(mcore_tp1)
    rope = install_rope(model, HEAD_DIM, BASE, RopeScaling.from_hf_dict(rope_scaling), MAX_POS)
    seq_len = 40
    q = torch.randn(seq_len, 2, 4, HEAD_DIM).bfloat16()  # [s, b, n, d]
    out = apply_rotary_pos_emb(q, rope(seq_len), model.config, mscale=rope.attention_factor)
    cos, sin = hf_cos_sin(rope_scaling, seq_len, dtype=torch.bfloat16)
    ref, _ = hf_apply_rotary_pos_emb(q.permute(1, 2, 0, 3), q.permute(1, 2, 0, 3), cos[None], sin[None])
    assert torch.equal(out.permute(1, 2, 0, 3), ref)


def test_reinstall_resets_attention_factor(mcore_tp1):
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    model = tiny_gpt(mcore_tp1)
    install_rope(model, HEAD_DIM, BASE, RopeScaling.from_hf_dict(CASES[3][1]), MAX_POS)
    assert _yarn_get_concentration_factor_from_config(model.config) > 1.0
    install_rope(model, HEAD_DIM, BASE, RopeScaling(), MAX_POS)
    assert _yarn_get_concentration_factor_from_config(model.config) == 1.0


def test_get_cos_sin_for_flash_decode_includes_factor(mcore_tp1):
    # The flash-decode path takes [s, d/2] cos/sin and applies no mscale, so it must be baked in.
    rope_scaling = CASES[3][1]
    rope = HFRotaryEmbedding(HEAD_DIM, BASE, RopeScaling.from_hf_dict(rope_scaling), MAX_POS)
    cos, sin = rope.get_cos_sin(32)
    ref_cos, ref_sin = hf_cos_sin(rope_scaling, 32)
    torch.testing.assert_close(cos, ref_cos[:, : HEAD_DIM // 2], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin[:, : HEAD_DIM // 2], atol=1e-6, rtol=0)


# --- the CPU fused-RoPE kernel ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rope_kernel_is_bit_identical_to_megatron_cores_unfused_rope(dtype, mcore_tp1, seeded):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_ct.model.rope import _CpuRope

    rope = HFRotaryEmbedding(HEAD_DIM, BASE, RopeScaling.from_hf_dict(dict(CASES)["llama3"]), MAX_POS)
    freqs = rope(40)  # [s, 1, 1, d]
    # A strided [s, b, heads, d] view, as megatron-core's key is a slice of the fused projection.
    base = (torch.randn(40, 2, 3, 2 * HEAD_DIM) * 3).to(dtype)
    ours, ref = base.clone().requires_grad_(), base.clone().requires_grad_()
    out = _CpuRope()(ours[..., :HEAD_DIM], freqs)
    expected = _apply_rotary_pos_emb_bshd(ref[..., :HEAD_DIM], freqs)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    assert torch.equal(out, expected)
    assert torch.equal(ours.grad, ref.grad)


def test_cpu_rope_kernel_follows_a_changed_or_new_angle_table(mcore_tp1, seeded):
    """cos and sin are cached per table: a table changed in place, or another one, is
    never answered from the cache."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_ct.model.rope import _CpuRope

    kernel = _CpuRope()
    rope = HFRotaryEmbedding(HEAD_DIM, BASE, RopeScaling.from_hf_dict({"rope_type": "default"}), MAX_POS)
    t = torch.randn(24, 2, 4, HEAD_DIM)
    freqs = rope(24).clone()
    assert torch.equal(kernel(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs))
    cached = kernel._cos_sin
    assert torch.equal(kernel(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs))
    assert kernel._cos_sin is cached  # the same table: computed once
    freqs.mul_(3.0)
    assert torch.equal(kernel(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs))
    other = rope(24) * 0.5
    assert torch.equal(kernel(t, other), _apply_rotary_pos_emb_bshd(t, other))
    with pytest.raises(RuntimeError, match="CPU RoPE kernel called on a meta tensor"):
        kernel(t.to("meta"), freqs)


def test_yarn_attention_factor_turns_the_fused_rope_off(mcore_tp1):
    """Fused RoPE kernels take no attention factor: a YaRN model asks for the unfused RoPE."""
    model = tiny_gpt(mcore_tp1)
    model.config.apply_rope_fusion = True
    install_rope(model, HEAD_DIM, BASE, RopeScaling.from_hf_dict({"rope_type": "default"}), MAX_POS)
    assert model.config.apply_rope_fusion  # factor 1: kept
    install_rope(model, HEAD_DIM, BASE, RopeScaling.from_hf_dict(dict(CASES)["yarn"]), MAX_POS)
    assert not model.config.apply_rope_fusion


# --- a curriculum stage's RoPE switch (megatron_ct/training/trainer.py:on_stage_start) ------------


def test_switched_rope_gives_the_logits_of_a_model_built_with_it(mcore_tp1):
    """switch_rope on a built model (a stage with a new theta, then YaRN, then back) computes
    what a model built fresh with those values computes, with the same weights."""
    from megatron.core import tensor_parallel

    from megatron_ct.config import load_config, validate_for_world
    from megatron_ct.model.llama import build_model
    from megatron_ct.model.rope import switch_rope
    from megatron_ct.parallel.device import activate_cpu_device_layer, deactivate_cpu_device_layer

    tiny = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4", "model.vocab_size=128"]
    tiny += ["model.ffn_hidden_size=96", "model.max_position_embeddings=64", "parallel.device=cpu"]
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}

    def built(*overrides: str) -> torch.nn.Module:
        cfg = load_config(None, [*tiny, *overrides])
        return build_model(cfg.model, validate_for_world(cfg, 1))[0][0].eval()

    tokens = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(48).expand(2, -1)

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(tokens, positions, attention_mask=None)

    activate_cpu_device_layer()  # megatron-core's rotary module places its table on the "current CUDA device"
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        model = built()
        before = logits(model)
        long = ["model.rotary_base=1e6", f"model.rope_scaling={yarn}", "model.max_position_embeddings=128"]
        for rope, overrides in [((1e6, None, 64), ["model.rotary_base=1e6"]), ((1e6, yarn, 128), long)]:
            switch_rope([model], 16, *rope)
            fresh = built(*overrides)
            fresh.load_state_dict(model.state_dict())
            got = logits(model)
            assert torch.equal(got, logits(fresh)) and not torch.equal(got, before), rope
        switch_rope([model], 16, 10000.0, None, 64)
        assert torch.equal(logits(model), before)  # back to the start (attention factor 1 again)
    finally:
        deactivate_cpu_device_layer()
