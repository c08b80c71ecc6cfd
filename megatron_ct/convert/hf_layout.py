"""How HF tensors and ``config.json`` become ours and back, for any model family.

What maps onto what is declared per family (megatron_ct/families: the HF config keys, the
tensor table, the architectures); this module is the mechanics the converters apply to it:
fusing and splitting q/k/v and gate/up, padding the vocabulary, and translating ``config.json``
<-> :class:`ModelConfig` (RoPE's two spellings, head_dim, tied embeddings).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_ct.config import ModelConfig
from megatron_ct.errors import ConversionError
from megatron_ct.families import ModelFamily, family_for_hf, family_of
from megatron_ct.families.spec import REQUIRED
from megatron_ct.model.rope import RopeScaling

# HF tensors that carry no weights (old checkpoints saved RoPE buffers).
IGNORABLE_HF_SUFFIXES = ("rotary_emb.inv_freq",)


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


def _rope_from_hf(hf: dict[str, Any], source: str, theta_default: float) -> tuple[float, dict | None]:
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
        theta = params.get("rope_theta", hf.get("rope_theta", theta_default))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        key = "rope_parameters"
    else:
        theta = hf.get("rope_theta", theta_default)
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
) -> tuple[ModelFamily, str, ModelConfig]:
    """(family, architecture, ModelConfig) for an HF ``config.json`` dict, or a one-line error."""
    family, arch = family_for_hf(hf, source)

    for key, value, default in family.hf_requires:
        got = hf.get(key)
        if (default if got is None else got) != value:
            raise ConversionError(f"{source}: {key}={got!r} is not supported; expected {value!r} for {arch}")
    fields: dict[str, Any] = {}
    for k in family.config_keys:
        spelled = next((name for name in (k.hf, *k.also) if hf.get(name) is not None), None)
        if spelled is not None:
            value = hf[spelled]
        elif k.default is REQUIRED:
            raise ConversionError(f"{source}: missing key {k.hf!r} (needed for {arch})")
        else:
            value = k.default
        fields[k.field] = (not value) if k.rule == "negated" else value
    hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
    fields["num_query_groups"] = fields["num_query_groups"] or heads
    # head_dim is recorded only where it differs from hidden / heads (Qwen3), so other models'
    # configs (Llama 3.2 and SmolLM2 spell head_dim out) stay what they were.
    if fields["kv_channels"] is not None and heads * fields["kv_channels"] == hidden:
        fields["kv_channels"] = None
    theta_default = next(k.default for k in family.config_keys if k.field == "rotary_base")
    fields["rotary_base"], fields["rope_scaling"] = _rope_from_hf(hf, source, theta_default)
    fields["norm_epsilon"] = float(fields["norm_epsilon"])
    if family.moe:  # HF adds its load-balancing loss only when the router logits are output
        coeff = fields["moe_aux_loss_coeff"] if hf.get("output_router_logits") else 0.0
        fields["moe_aux_loss_coeff"] = float(coeff)
    fields["init_method_std"] = float(fields["init_method_std"])
    try:
        m = ModelConfig(family=family.name, make_vocab_size_divisible_by=make_vocab_size_divisible_by, **fields)
    except ValueError as e:  # ConfigError: names our key, which came from config.json
        raise ConversionError(f"{source}: {e}") from None
    return family, arch, m


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


def architecture_for(m: ModelConfig, requested: str | None, source: str) -> str:
    """The HF architecture to export ``m`` as: ``requested`` if the model's family has it, else
    the family's first."""
    family = family_of(m)
    if requested is None:
        return family.architecture_names[0]
    if requested not in family.architecture_names:
        known = {a for f in _families().values() for a in f.architecture_names}
        if requested not in known:
            raise ConversionError(
                f"{source}: architecture {requested!r} is not supported; expected one of {', '.join(sorted(known))}"
            )
        raise ConversionError(
            f"{source}: architecture {requested!r} does not fit model.family={family.name}; expected "
            f"{' or '.join(family.architecture_names)}"
        )
    return requested


def _families():
    from megatron_ct.families import all_families

    return all_families()


def hf_config_from_model(
    m: ModelConfig, arch: str, dtype: torch.dtype, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``config.json`` for our model. With ``base`` (the original HF config), every key not
    set by our model is kept, and RoPE is written in the base's style (transformers 5
    ``rope_parameters`` or top-level ``rope_theta`` + ``rope_scaling``); otherwise a fresh
    config in the older style, which transformers 4 and 5 both read."""
    family = family_of(m)
    spec = family.architecture(arch)
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
    out.update(architectures=[arch], model_type=spec.model_type)
    for k in family.config_keys:
        key = next((name for name in (k.hf, *k.also) if name in out), k.hf)  # the base's spelling
        if k.rule == "same":
            out[key] = getattr(m, k.field)
        elif k.rule == "negated":
            out[key] = not getattr(m, k.field)
    out["num_key_value_heads"] = m.num_query_groups
    if family.moe:
        out["output_router_logits"] = m.moe_aux_loss_coeff > 0
        if m.moe_aux_loss_coeff > 0 or "router_aux_loss_coef" not in out:
            out["router_aux_loss_coef"] = m.moe_aux_loss_coeff
    if "head_dim" in out or m.kv_channels is not None or family.qk_norm:
        out["head_dim"] = m.head_dim
    out.setdefault("initializer_range", m.init_method_std)
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
