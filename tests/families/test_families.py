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
    "llama-tied-mha": ("llama", 4, None, True),
    "qwen2-tied-bias": ("qwen2", 2, None, True),
    "qwen2-untied-bias": ("qwen2", 1, None, False),
    "qwen3-head-dim": ("qwen3", 2, 24, True),
    "qwen3-untied": ("qwen3", 4, None, False),
}
BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=300)


def hf_model_config(name: str) -> tuple[str, ModelConfig]:
    model_type, config = REAL[name]
    return model_type, model_config_from_hf(config, name)[2]


def test_every_family_is_registered():
    assert set(all_families()) >= {"llama", "qwen2", "qwen3"}
    archs = [a for f in all_families().values() for a in f.architecture_names]
    assert len(archs) == len(set(archs)), "an HF architecture must belong to one family"


@pytest.mark.parametrize("name", TINY)
def test_parameter_count_equals_the_built_model(name, mcore_tp1):
    """The count derived from the spec equals ``sum(p.numel())`` of megatron-core's model, and
    each stored tensor has the spec's shape."""
    from megatron_ct.checkpoint.dist_ckpt import unwrap
    from megatron_ct.model.llama import build_model

    family, groups, head_dim, tied = TINY[name]
    model = {**BASE, "family": family, "num_query_groups": groups, "untie_embeddings_and_output_weights": not tied}
    if head_dim:
        model["kv_channels"] = head_dim
    cfg = load_config(None, [f"model.{k}={v}" for k, v in model.items()] + ["parallel.device=cpu"])
    m = cfg.model
    chunks, info = build_model(m, validate_for_world(cfg, 1))
    family = family_of(m)
    padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1)
    built = sum(p.numel() for c in chunks for p in c.parameters())
    assert built == info.num_parameters == family.num_parameters(m, padded)
    state = {k: v for k, v in unwrap(chunks[0]).state_dict().items() if "_extra_state" not in k}
    shapes = family.ct_shapes(m, padded)
    stacked = {}
    for key, t in state.items():  # decoder.layers.<i>.<suffix> -> the stacked key of the table
        parts = key.split(".")
        if key.startswith("decoder.layers."):
            stacked.setdefault("decoder.layers." + ".".join(parts[3:]), []).append(tuple(t.shape))
        else:
            stacked[key] = [tuple(t.shape)]
    aliases = family.ct_aliases()
    got = {aliases.get(k, k): (len(v), *v[0]) if k.startswith("decoder.layers.") else v[0] for k, v in stacked.items()}
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
    [("llama-3.2-1b", [1, 2, 4, 8]), ("smollm2-135m", [1, 3]), ("qwen2.5-0.5b", [1, 2]), ("qwen3-0.6b", [1, 2, 4, 8])],
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


def test_family_is_detected_from_old_configs_and_must_agree():
    assert ModelConfig().family == "llama"
    assert ModelConfig(add_qkv_bias=True).family == "qwen2"
    assert ModelConfig(qk_layernorm=True, kv_channels=64).family == "qwen3"
    m = ModelConfig(family="qwen2")
    assert (m.add_qkv_bias, m.qk_layernorm) == (True, False)
    with pytest.raises(ConfigError, match=r"^model.qk_layernorm: expected False \(model.family=qwen2\), got True$"):
        ModelConfig(family="qwen2", qk_layernorm=True)
    with pytest.raises(ConfigError, match=r"^model.family: expected one of llama, qwen2, qwen3.*got 'gpt2'$"):
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
