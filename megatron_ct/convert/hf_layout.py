"""What maps onto what: HF ``config.json`` <-> :class:`ModelConfig`, and tensor by tensor.

Our model is megatron-core's ``GPTModel`` as LLaMA. Facts about its tensors (global,
i.e. TP-unsharded, coordinates, as dist checkpoints store them):

- ``linear_qkv.weight`` ``[(nq + 2 * ng) * d, h]`` is laid out per query group: for each of
  the ``ng`` groups, its ``nq / ng`` query heads, then its key head, then its value head,
  ``d`` rows each. Tensor parallelism cuts it into contiguous row blocks, i.e. whole groups.
  HF keeps ``q_proj`` ``[nq * d, h]``, ``k_proj`` / ``v_proj`` ``[ng * d, h]`` apart, heads in
  order; query head ``j`` belongs to group ``j // (nq / ng)`` in both. The QKV bias (Qwen2)
  is laid out the same way.
- ``linear_fc1.weight`` ``[2 * f, h]`` is ``cat([gate_proj, up_proj])``; megatron-core's
  SwiGLU is ``silu(x W_gate) * (x W_up)`` on its two halves.
- Transformer layers are stacked under one key with a leading layer axis (global layer
  index), e.g. ``decoder.layers.mlp.linear_fc2.weight`` ``[L, h, f]``.
- Qwen3's per-head ``q_norm`` / ``k_norm`` (``[d]``, applied to every query / key head before
  RoPE) are megatron-core's ``self_attention.q_layernorm`` / ``k_layernorm`` (``qk_layernorm``),
  and its explicit ``head_dim`` is ``kv_channels``: ``d`` need not be hidden / heads.
- The input and pre-MLP RMSNorm weights are stored as ``linear_qkv.layer_norm_weight`` and
  ``linear_fc1.layer_norm_weight`` by both layer specs: Transformer Engine fuses them into
  those modules, and the local spec maps its ``input_layernorm`` / ``pre_mlp_layernorm``
  onto the same checkpoint keys. Reading also accepts the unfused spellings.
- The word embedding and the untied output layer have ``padded_vocab_size`` rows (see
  :func:`megatron_ct.model.llama.padded_vocab_size`); rows past the true vocabulary are padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_ct.checkpoint import keys
from megatron_ct.config import ModelConfig
from megatron_ct.errors import ConversionError
from megatron_ct.model.rope import RopeScaling


@dataclass(frozen=True)
class Architecture:
    """One supported HF ``architectures`` entry."""

    model_type: str
    qkv_bias: bool
    """q/k/v projections carry a bias (Qwen2); o_proj and the MLP never do."""
    extra_config: tuple[tuple[str, Any], ...]
    """Keys a freshly written ``config.json`` gets besides the shared ones."""
    qk_norm: bool = False
    """Per-head RMSNorm of queries and keys before RoPE (Qwen3's q_norm / k_norm)."""


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("llama", False, (("attention_bias", False), ("mlp_bias", False))),
    "MistralForCausalLM": Architecture("mistral", False, (("sliding_window", None),)),
    "Qwen2ForCausalLM": Architecture("qwen2", True, (("use_sliding_window", False), ("sliding_window", None))),
    "Qwen3ForCausalLM": Architecture(
        "qwen3",
        False,
        (("attention_bias", False), ("use_sliding_window", False), ("sliding_window", None)),
        qk_norm=True,
    ),
}

# HF defaults for keys a config.json may leave out (LlamaConfig / MistralConfig / Qwen2Config).
_HF_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu"}

# --- tensor names --------------------------------------------------------------------

HF_EMBED = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"

CT_EMBED = keys.EMBEDDING
CT_FINAL_NORM = keys.FINAL_NORM
CT_OUTPUT = keys.OUTPUT
CT_LAYER = keys.LAYER_PREFIX


@dataclass(frozen=True)
class LayerTensor:
    """One stacked megatron-core tensor and the HF per-layer tensors it is made of."""

    ct_suffix: str
    hf_suffixes: tuple[str, ...]
    kind: str
    """'copy' (one HF tensor), 'qkv' (fuse q, k, v per group) or 'gate_up' (concatenate)."""
    ct_aliases: tuple[str, ...] = ()
    """Other spellings of the key accepted when reading (unfused layer specs)."""

    @property
    def ct_key(self) -> str:
        return CT_LAYER + self.ct_suffix

    def hf_names(self, layer: int) -> tuple[str, ...]:
        return tuple(f"model.layers.{layer}.{s}" for s in self.hf_suffixes)


def layer_tensors(qkv_bias: bool, qk_norm: bool = False) -> list[LayerTensor]:
    """The per-layer tensors of our LLaMA, in the order conversion walks them."""
    out = [
        LayerTensor(
            "self_attention.linear_qkv.layer_norm_weight",
            ("input_layernorm.weight",),
            "copy",
            ("input_layernorm.weight",),
        ),
        LayerTensor(
            "self_attention.linear_qkv.weight",
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            "qkv",
        ),
    ]
    if qkv_bias:
        out.append(
            LayerTensor(
                "self_attention.linear_qkv.bias",
                ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                "qkv",
            )
        )
    if qk_norm:
        out += [
            LayerTensor("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "copy"),
            LayerTensor("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "copy"),
        ]
    out += [
        LayerTensor("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
        LayerTensor(
            "mlp.linear_fc1.layer_norm_weight",
            ("post_attention_layernorm.weight",),
            "copy",
            ("pre_mlp_layernorm.weight",),
        ),
        LayerTensor("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
        LayerTensor("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
    ]
    return out


# megatron-core's local linear layers save an (empty) ``_extra_state`` object per layer; a
# checkpoint must have them or loading reports missing keys.

# HF tensors that carry no weights (old checkpoints saved RoPE buffers).
IGNORABLE_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model and its shape; ``lm_head`` only when untied."""
    h, d = m.hidden_size, m.head_dim
    nq, ng, f = m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (nq * d, h),
        "self_attn.k_proj.weight": (ng * d, h),
        "self_attn.v_proj.weight": (ng * d, h),
        "self_attn.o_proj.weight": (h, nq * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if m.add_qkv_bias:
        per_layer.update(
            {"self_attn.q_proj.bias": (nq * d,), "self_attn.k_proj.bias": (ng * d,), "self_attn.v_proj.bias": (ng * d,)}
        )
    if m.qk_layernorm:
        per_layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    shapes = {HF_EMBED: (m.vocab_size, h), HF_FINAL_NORM: (h,)}
    for i in range(m.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    if m.untie_embeddings_and_output_weights:
        shapes[HF_LM_HEAD] = (m.vocab_size, h)
    return shapes


def expected_ct_shapes(m: ModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every dist-checkpoint tensor of the model and its global shape."""
    h, d = m.hidden_size, m.head_dim
    nq, ng, f, L = m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size, m.num_layers
    qkv_rows = (nq + 2 * ng) * d
    per_layer = {
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_proj.weight": (h, nq * d),
        "mlp.linear_fc1.layer_norm_weight": (h,),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
    }
    if m.add_qkv_bias:
        per_layer["self_attention.linear_qkv.bias"] = (qkv_rows,)
    if m.qk_layernorm:
        per_layer["self_attention.q_layernorm.weight"] = (d,)
        per_layer["self_attention.k_layernorm.weight"] = (d,)
    shapes = {CT_EMBED: (padded_vocab, h), CT_FINAL_NORM: (h,)}
    shapes.update({CT_LAYER + k: (L, *v) for k, v in per_layer.items()})
    if m.untie_embeddings_and_output_weights:
        shapes[CT_OUTPUT] = (padded_vocab, h)
    return shapes


# --- tensor transforms ---------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """HF q ``[nq*d, ...]``, k, v ``[ng*d, ...]`` -> megatron-core ``[(nq + 2ng)*d, ...]``
    (per group: its query heads, its key head, its value head). Works for weights and biases."""
    rest = q.shape[1:]
    g = num_query_groups
    # [g, heads_per_group*d | d | d, ...] then flatten the group axis back into rows.
    return torch.cat([q.reshape(g, -1, *rest), k.reshape(g, -1, *rest), v.reshape(g, -1, *rest)], dim=1).reshape(
        -1, *rest
    )


def split_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv`: ``[(nq + 2ng)*d, ...]`` -> contiguous q, k, v."""
    rest = qkv.shape[1:]
    g, per_group = num_query_groups, num_heads // num_query_groups
    d = qkv.shape[0] // (num_heads + 2 * g)
    q, k, v = qkv.reshape(g, (per_group + 2) * d, *rest).split([per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[f, h]`` twice -> ``linear_fc1`` ``[2f, h]``."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """``[V, h]`` -> ``[padded, h]`` with zero rows: padding tokens never occur in data, and
    zero rows keep their logits at 0 whatever the input."""
    if weight.shape[0] == padded_vocab:
        return weight
    out = weight.new_zeros((padded_vocab, *weight.shape[1:]))
    out[: weight.shape[0]] = weight
    return out


# --- config.json <-> ModelConfig ---------------------------------------------------------


def _rope_from_hf(hf: dict[str, Any], source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from transformers 5 ``rope_parameters`` or the
    older top-level ``rope_theta`` + ``rope_scaling``."""
    params = hf.get("rope_parameters")
    if (
        params
        and hf.get("rope_scaling")
        and hf["rope_scaling"] != {k: v for k, v in params.items() if k != "rope_theta"}
    ):
        raise ConversionError(
            f"{source}: rope_parameters={params} and rope_scaling={hf['rope_scaling']} disagree; keep one"
        )
    if params:
        theta = params.get("rope_theta", hf.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        key = "rope_parameters"
    else:
        theta = hf.get("rope_theta", _HF_DEFAULTS["rope_theta"])
        scaling = dict(hf.get("rope_scaling") or {})
        key = "rope_scaling"
    if scaling.get("rope_type", scaling.get("type")) == "default" and len(scaling) == 1:
        scaling = {}
    try:
        RopeScaling.from_hf_dict(scaling or None)
    except ValueError as e:
        raise ConversionError(f"{source}: {key}: {e}") from None
    return float(theta), (scaling or None)


def model_config_from_hf(
    hf: dict[str, Any], source: str, make_vocab_size_divisible_by: int = 128
) -> tuple[str, ModelConfig]:
    """(architecture, ModelConfig) for an HF ``config.json`` dict, or a one-line error."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise ConversionError(
            f"{source}: architectures={archs!r} is not supported; expected one of {', '.join(ARCHITECTURES)}"
        )
    spec = ARCHITECTURES[arch]

    def need(key: str) -> Any:
        if key not in hf:
            raise ConversionError(f"{source}: missing key {key!r} (needed for {arch})")
        return hf[key]

    def unsupported(key: str, value: Any, expected: str) -> ConversionError:
        return ConversionError(f"{source}: {key}={value!r} is not supported; expected {expected}")

    act = hf.get("hidden_act", _HF_DEFAULTS["hidden_act"])
    if act != "silu":
        raise unsupported("hidden_act", act, "'silu' (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise unsupported(key, hf[key], "false (our model has no o_proj/MLP biases)")
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = hf.get("head_dim")
    # Recorded only where it differs from hidden / heads (Qwen3), so other models' configs
    # (Llama 3.2 and SmolLM2 spell head_dim out) stay what they were.
    kv_channels = head_dim if head_dim is not None and heads * head_dim != hidden else None
    theta, scaling = _rope_from_hf(hf, source)
    try:
        m = ModelConfig(
            num_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            max_position_embeddings=need("max_position_embeddings"),
            rotary_base=theta,
            rope_scaling=scaling,
            norm_epsilon=float(hf.get("rms_norm_eps", _HF_DEFAULTS["rms_norm_eps"])),
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", _HF_DEFAULTS["tie_word_embeddings"]),
            add_qkv_bias=spec.qkv_bias,
            kv_channels=kv_channels,
            qk_layernorm=spec.qk_norm,
            init_method_std=float(hf.get("initializer_range", 0.02)),
        )
    except ValueError as e:  # ConfigError: names our key, which came from config.json
        raise ConversionError(f"{source}: {e}") from None
    return arch, m


def sliding_window_warning(hf: dict[str, Any], source: str) -> str | None:
    """Our attention is full causal; a sliding window shorter than the context changes the
    result for sequences longer than the window (Mistral-7B-v0.1: 4096)."""
    window = hf.get("sliding_window")
    active = window is not None and hf.get("use_sliding_window", True)
    if active and window < hf.get("max_position_embeddings", 0):
        return (
            f"{source}: sliding_window={window} is not implemented (full causal attention); outputs "
            f"match HF only for sequences of at most {window} tokens"
        )
    return None


def default_architecture(m: ModelConfig) -> str:
    if m.qk_layernorm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if m.add_qkv_bias else "LlamaForCausalLM"


def valid_tp_sizes(m: ModelConfig) -> list[int]:
    """Tensor-parallel sizes the model can be split at: divisors of the query heads that also
    divide the key/value heads and the FFN width."""
    return [
        t
        for t in range(1, m.num_attention_heads + 1)
        if m.num_attention_heads % t == 0 and m.num_query_groups % t == 0 and m.ffn_hidden_size % t == 0
    ]


def check_tp_size(m: ModelConfig, tp: int, key: str) -> None:
    """One-line ConversionError listing the valid sizes when ``tp`` does not divide the model."""
    sizes = valid_tp_sizes(m)
    if tp not in sizes:
        raise ConversionError(
            f"{key} {tp}: expected one of {', '.join(map(str, sizes))} (a divisor of num_attention_heads="
            f"{m.num_attention_heads}, num_query_groups={m.num_query_groups} and ffn_hidden_size={m.ffn_hidden_size})"
        )


def check_architecture_fits(arch: str, m: ModelConfig, source: str) -> Architecture:
    if arch not in ARCHITECTURES:
        raise ConversionError(
            f"{source}: architecture {arch!r} is not supported; expected one of {', '.join(ARCHITECTURES)}"
        )
    spec = ARCHITECTURES[arch]
    if spec.qk_norm != m.qk_layernorm:
        raise ConversionError(
            f"{source}: model.qk_layernorm={m.qk_layernorm} does not fit {arch} (q/k norm "
            f"{'required' if spec.qk_norm else 'not supported'}); choose "
            f"{'Qwen3ForCausalLM' if m.qk_layernorm else 'another architecture'}"
        )
    if spec.qkv_bias != m.add_qkv_bias:
        raise ConversionError(
            f"{source}: model.add_qkv_bias={m.add_qkv_bias} does not fit {arch} (QKV bias "
            f"{'required' if spec.qkv_bias else 'not supported'}); choose "
            f"{'Qwen2ForCausalLM' if m.add_qkv_bias else 'LlamaForCausalLM or MistralForCausalLM'}"
        )
    return spec


def hf_config_from_model(
    m: ModelConfig, arch: str, dtype: torch.dtype, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``config.json`` for our model. With ``base`` (the original HF config), every key not
    set by our model is kept, and RoPE is written in the base's style (transformers 5
    ``rope_parameters`` or top-level ``rope_theta`` + ``rope_scaling``); otherwise a fresh
    config in the older style, which transformers 4 and 5 both read."""
    spec = ARCHITECTURES[arch]
    out: dict[str, Any] = (
        dict(base)
        if base
        else {
            "model_type": spec.model_type,
            **dict(spec.extra_config),
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_cache": True,
        }
    )
    theta = int(m.rotary_base) if float(m.rotary_base).is_integer() else m.rotary_base
    out.update(
        architectures=[arch],
        model_type=spec.model_type,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        vocab_size=m.vocab_size,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
    )
    if "head_dim" in out or m.kv_channels is not None or spec.qk_norm:
        out["head_dim"] = m.head_dim
    if "initializer_range" not in out:
        out["initializer_range"] = m.init_method_std
    if base and "rope_parameters" in base:
        old_theta = (base.get("rope_parameters") or {}).get("rope_theta")
        out["rope_parameters"] = {
            **(m.rope_scaling or {"rope_type": "default"}),
            "rope_theta": old_theta if old_theta == m.rotary_base else theta,
        }
    else:
        old_theta = (base or {}).get("rope_theta")
        out["rope_theta"] = old_theta if old_theta == m.rotary_base else float(m.rotary_base)
        out["rope_scaling"] = dict(m.rope_scaling) if m.rope_scaling else None
    # transformers 5 writes "dtype", 4 "torch_dtype"; keep the base's (or its absence).
    for key in ("dtype", "torch_dtype"):
        if key in out or (key == "torch_dtype" and not base):
            out[key] = str(dtype).removeprefix("torch.")
    return out
