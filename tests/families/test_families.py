"""Model families: what derives from each spec (counts, shapes, TP splits, FLOPs) is what the built
model and Hugging Face have, for every family, and a new family is one new file."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from real_configs import REAL

from megatron_ct.config import ConfigError, ModelConfig, load_config, validate_for_world
from megatron_ct.convert.hf_layout import model_config_from_hf
from megatron_ct.families import all_families, family_of
from megatron_ct.model.llama import padded_vocab_size

# Tiny configs that exercise every variable the table depends on: GQA and MHA, tied and untied,
# a vocabulary that pads, a head width that is not hidden / heads (Qwen3).
TINY = {  # name: (family, key/value heads, head width or None, tied)
    "llama-untied-gqa": ("llama", 2, None, False),
    "mixtral-untied": ("mixtral", 2, None, False),
    "qwen3-moe-head-dim-tied": ("qwen3_moe", 2, 24, True),
    "llama-tied-mha": ("llama", 4, None, True),
    "qwen2-tied-bias": ("qwen2", 2, None, True),
    "qwen2-untied-bias": ("qwen2", 1, None, False),
    "qwen3-head-dim": ("qwen3", 2, 24, True),
    "qwen3-untied": ("qwen3", 4, None, False),
}
BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=300)
MOE = dict(num_experts=4, moe_ffn_hidden_size=40, moe_router_topk=2)  # the MoE families' TINY extras


def hf_model_config(name: str) -> tuple[str, ModelConfig]:
    model_type, config = REAL[name]
    return model_type, model_config_from_hf(config, name)[2]


def test_every_family_is_registered():
    assert set(all_families()) >= {"llama", "qwen2", "qwen3", "mixtral", "qwen3_moe"}
    archs = [a for f in all_families().values() for a in f.architecture_names]
    assert len(archs) == len(set(archs)), "an HF architecture must belong to one family"


@pytest.mark.parametrize("name", TINY)
def test_parameter_count_equals_the_built_model(name, mcore_tp1):
    """The count derived from the spec equals ``sum(p.numel())`` of megatron-core's model, and
    each stored tensor has the spec's shape."""
    from megatron_ct.checkpoint.dist_ckpt import unwrap
    from megatron_ct.model.llama import build_model
    from megatron_ct.parallel.device import activate_cpu_device_layer, deactivate_cpu_device_layer

    family, groups, head_dim, tied = TINY[name]
    model = {**BASE, "family": family, "num_query_groups": groups, "untie_embeddings_and_output_weights": not tied}
    if head_dim:
        model["kv_channels"] = head_dim
    if all_families()[family].moe:
        model.update(MOE)
    cfg = load_config(None, [f"model.{k}={v}" for k, v in model.items()] + ["parallel.device=cpu"])
    m = cfg.model
    activate_cpu_device_layer()  # megatron-core's MoE dispatcher makes a CUDA stream when built
    try:
        chunks, info = build_model(m, validate_for_world(cfg, 1))
    finally:
        deactivate_cpu_device_layer()
    family = family_of(m)
    padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1)
    built = sum(p.numel() for c in chunks for p in c.parameters())
    assert built == info.num_parameters == family.num_parameters(m, padded)
    state = {k: v for k, v in unwrap(chunks[0]).state_dict().items() if "_extra_state" not in k}
    shapes = family.ct_shapes(m, padded)
    stacked = {}
    experts = {}
    for key, t in state.items():  # decoder.layers.<i>.<suffix> -> the stacked key of the table
        parts = key.split(".")
        if ".local_experts." in key:  # decoder.layers.<i>.mlp.experts.local_experts.<e>.<suffix>
            k = "decoder.layers.mlp.experts.experts." + ".".join(parts[7:])
            experts.setdefault(k, set()).add((int(parts[2]), int(parts[6]), tuple(t.shape)))
        elif key.startswith("decoder.layers."):
            stacked.setdefault("decoder.layers." + ".".join(parts[3:]), []).append(tuple(t.shape))
        else:
            stacked[key] = [tuple(t.shape)]
    aliases = family.ct_aliases()
    got = {aliases.get(k, k): (len(v), *v[0]) if k.startswith("decoder.layers.") else v[0] for k, v in stacked.items()}
    for key, seen in experts.items():  # every (layer, expert) once, one shape: [L, E, ...]
        (shape,) = {s for _, _, s in seen}
        assert len(seen) == m.num_layers * m.num_experts
        got[key] = (m.num_layers, m.num_experts, *shape)
    if not m.untie_embeddings_and_output_weights:
        got.pop("output_layer.weight", None)  # megatron-core keeps no separate tensor when tied on one stage
    assert got == shapes


@pytest.mark.parametrize("name", REAL)
def test_parameter_count_equals_hugging_face_at_real_sizes(name):
    """Released configs counted without allocating: the spec's count (true vocabulary) is what
    transformers builds. This is the N of every D-CPT fit."""
    transformers = pytest.importorskip("transformers")
    model_type, m = hf_model_config(name)
    _, config = REAL[name]
    hf_config = transformers.AutoConfig.for_model(
        model_type, **{k: v for k, v in config.items() if k != "architectures"}
    )
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert family_of(m).num_parameters(m) == hf.num_parameters()


def test_qwen3_count_includes_its_head_width():
    """Qwen3-0.6B's attention is 16 heads of 128 on a 1024 hidden: counting h / heads per head
    (the old D-CPT count) misses ~15% of the model."""
    _, m = hf_model_config("qwen3-0.6b")
    n = family_of(m).num_parameters(m)
    assert 596e6 < n < 597e6  # 596,049,920 as released
    assert m.head_dim == 128 and m.kv_channels == 128


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("llama-3.2-1b", [1, 2, 4, 8]),
        ("smollm2-135m", [1, 3]),
        ("qwen2.5-0.5b", [1, 2]),
        ("qwen3-0.6b", [1, 2, 4, 8]),
        ("qwen3-30b-a3b", [1, 2, 4]),  # 4 key/value heads; experts of 768
        ("mixtral-8x7b-v0.1", [1, 2, 4, 8]),
    ],
)
def test_valid_tp_sizes_from_the_table(name, sizes):
    _, m = hf_model_config(name)
    assert family_of(m).valid_tp_sizes(m) == sizes


def test_trainer_and_converter_share_the_tp_check():
    from megatron_ct.convert.hf_to_ct import check_layout
    from megatron_ct.errors import ConversionError

    _, m = hf_model_config("smollm2-135m")
    expected = "expected one of 1, 3 (a divisor of num_attention_heads=9, num_query_groups=3 and ffn_hidden_size=1536)"
    cfg = load_config(None, [f"model.{k}={v}" for k, v in BASE.items()] + ["parallel.tensor_model_parallel_size=2"])
    cfg.model = m
    with pytest.raises(ConfigError) as trainer:
        validate_for_world(cfg, 2)
    assert str(trainer.value) == f"parallel.tensor_model_parallel_size: {expected}, got 2"
    with pytest.raises(ConversionError) as converter:
        check_layout(m, 2, 1)
    assert str(converter.value) == f"--target-tp: {expected}, got 2"


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen3-0.6b", "qwen2.5-0.5b"])
def test_flops_per_token_by_hand(name):
    """Per layer: QKV, attention scores and weighted sum over the sequence, output projection,
    SwiGLU; then the logits; training = 3x forward. Biases and norms are not GEMMs."""
    _, m = hf_model_config(name)
    s, v = 4096, 128 * 1024
    h, f, q, kv = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    per_layer = 2 * h * (q + 2 * kv) + 4 * s * q + 2 * q * h + 6 * h * f
    assert family_of(m).flops_per_token(m, s, v) == 3 * (m.num_layers * per_layer + 2 * h * v)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b-v0.1"])
def test_moe_flops_count_the_router_and_the_active_experts(name):
    """A token passes the router ([E, h]) and top-k of the E experts (SwiGLU of width fe each)."""
    _, m = hf_model_config(name)
    s, v = 4096, 128 * 1024
    h, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    k, e, fe = m.moe_router_topk, m.num_experts, m.moe_ffn_hidden_size
    per_layer = 2 * h * (q + 2 * kv) + 4 * s * q + 2 * q * h + 2 * e * h + k * 6 * h * fe
    assert family_of(m).flops_per_token(m, s, v) == 3 * (m.num_layers * per_layer + 2 * h * v)


def test_moe_router_settings_from_hugging_face():
    """Experts, top-k, expert width, renormalisation and the aux loss come from config.json."""
    from real_configs import MIXTRAL_8X7B_V0_1, QWEN3_30B_A3B

    _, qwen = hf_model_config("qwen3-30b-a3b")
    assert (qwen.family, qwen.num_experts, qwen.moe_router_topk) == ("qwen3_moe", 128, 8)
    assert (qwen.moe_ffn_hidden_size, qwen.ffn_hidden_size, qwen.moe_norm_topk_prob) == (768, 6144, True)
    assert qwen.moe_aux_loss_coeff == 0.0  # output_router_logits false: HF trains without it
    _, _, m = model_config_from_hf({**QWEN3_30B_A3B, "norm_topk_prob": False, "output_router_logits": True}, "q")
    assert (m.moe_norm_topk_prob, m.moe_aux_loss_coeff) == (False, 0.001)
    # transformers 5 writes num_experts as num_local_experts
    spelled = {k: v for k, v in QWEN3_30B_A3B.items() if k != "num_experts"} | {"num_local_experts": 16}
    assert model_config_from_hf(spelled, "q")[2].num_experts == 16
    _, mixtral = hf_model_config("mixtral-8x7b-v0.1")
    assert (mixtral.num_experts, mixtral.moe_router_topk, mixtral.moe_ffn_hidden_size) == (8, 2, 14336)
    assert mixtral.moe_norm_topk_prob is True
    _, _, m = model_config_from_hf({**MIXTRAL_8X7B_V0_1, "output_router_logits": True}, "x")
    assert m.moe_aux_loss_coeff == 0.02


@pytest.mark.parametrize(
    "name, key, value, message",
    [
        (
            "qwen3-30b-a3b",
            "decoder_sparse_step",
            2,
            "q: decoder_sparse_step=2 is not supported; expected 1",
        ),
        ("qwen3-30b-a3b", "mlp_only_layers", [0], "q: mlp_only_layers=[0] is not supported; expected []"),
        ("mixtral-8x7b-v0.1", "router_jitter_noise", 0.1, "q: router_jitter_noise=0.1 is not supported"),
    ],
)
def test_moe_settings_without_an_implementation_are_one_line_errors(name, key, value, message):
    from megatron_ct.errors import ConversionError

    _, config = REAL[name]
    with pytest.raises(ConversionError) as e:
        model_config_from_hf({**config, key: value}, "q")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_moe_config_checks():
    moe = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=300)
    with pytest.raises(ConfigError, match=r"^model.num_experts: expected a positive integer \(model.family=mixtral"):
        ModelConfig(family="mixtral", **moe)
    with pytest.raises(ConfigError, match=r"^model.num_experts: expected null \(model.family=llama is dense\), got 4$"):
        ModelConfig(family="llama", num_experts=4, **moe)
    with pytest.raises(
        ConfigError, match=r"^model.moe_router_topk: expected an integer in \[1, num_experts=4\], got 5$"
    ):
        ModelConfig(family="qwen3_moe", num_experts=4, moe_router_topk=5, **moe)
    # megatron-core refuses top-1 with renormalised weights (a ValueError when the model is built)
    with pytest.raises(ConfigError, match=r"^model.moe_router_topk: expected at least 2 with model.moe_norm_topk_prob"):
        ModelConfig(family="mixtral", num_experts=4, moe_router_topk=1, **moe)
    assert ModelConfig(family="qwen3_moe", num_experts=4, moe_router_topk=1, moe_norm_topk_prob=False, **moe)
    with pytest.raises(
        ConfigError, match=r"^model.moe_norm_topk_prob: expected True \(model.family=mixtral\), got False$"
    ):
        ModelConfig(family="mixtral", num_experts=4, moe_norm_topk_prob=False, **moe)
    with pytest.raises(ConfigError, match=r"^model.moe_expert_capacity_factor: expected a number > 0 or null"):
        ModelConfig(family="mixtral", num_experts=4, moe_expert_capacity_factor=0, **moe)
    with pytest.raises(ConfigError, match=r"^model.moe_z_loss_coeff: expected a number >= 0, got -0.1$"):
        ModelConfig(family="mixtral", num_experts=4, moe_z_loss_coeff=-0.1, **moe)
    m = ModelConfig(family="mixtral", num_experts=4, ffn_hidden_size=96, **moe)
    assert m.moe_ffn_hidden_size == 96  # defaults to the dense width
    cfg = load_config(None, [f"model.{k}={v}" for k, v in {**moe, "family": "mixtral", "num_experts": 6}.items()])
    cfg.parallel.expert_model_parallel_size = 4
    with pytest.raises(
        ConfigError, match=r"^parallel.expert_model_parallel_size: expected a divisor of model.num_experts=6, got 4$"
    ):
        validate_for_world(cfg, 4)


def test_family_is_detected_from_old_configs_and_must_agree():
    assert ModelConfig().family == "llama"
    assert ModelConfig(add_qkv_bias=True).family == "qwen2"
    assert ModelConfig(qk_layernorm=True, kv_channels=64).family == "qwen3"
    m = ModelConfig(family="qwen2")
    assert (m.add_qkv_bias, m.qk_layernorm) == (True, False)
    with pytest.raises(ConfigError, match=r"^model.qk_layernorm: expected False \(model.family=qwen2\), got True$"):
        ModelConfig(family="qwen2", qk_layernorm=True)
    with pytest.raises(ConfigError, match=r"^model.family: expected one of llama, mixtral, qwen2, qwen3.*got 'gpt2'$"):
        ModelConfig(family="gpt2")
    with pytest.raises(ConfigError, match=r"set model.family$"):
        ModelConfig(add_qkv_bias=True, qk_layernorm=True)


def test_a_new_family_is_one_new_file(tmp_path, monkeypatch):
    """A module that defines FAMILY, dropped into the package, is a family: detected from an HF
    config, with shapes, counts and TP sizes derived, and chosen by ``model.family``."""
    import megatron_ct.families as families

    (tmp_path / "toy.py").write_text(
        textwrap.dedent(
            """
            from megatron_ct.families.spec import HFArchitecture, decoder_family

            FAMILY = decoder_family("toy", "a test family", (HFArchitecture("ToyForCausalLM", "toy"),))
            """
        )
    )
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    families.all_families.cache_clear()
    try:
        _, config = REAL["smollm2-135m"]
        family, arch, m = model_config_from_hf({**config, "architectures": ["ToyForCausalLM"]}, "toy/config.json")
        assert (family.name, arch, m.family) == ("toy", "ToyForCausalLM", "toy")
        _, llama = hf_model_config("smollm2-135m")
        assert family.num_parameters(m) == family_of(llama).num_parameters(llama)
        assert family.valid_tp_sizes(m) == [1, 3]
        assert ModelConfig(family="toy").family == "toy"
    finally:
        families.all_families.cache_clear()
        sys.modules.pop("megatron_ct.families.toy", None)
