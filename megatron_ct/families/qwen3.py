"""Qwen3 (dense): the LLaMA decoder with a per-head RMSNorm of queries and keys before RoPE
(``q_norm`` / ``k_norm``: megatron-core's ``qk_layernorm``) and an explicit ``head_dim`` that need
not be hidden / heads (Qwen3-0.6B: 16 heads of 128 on a 1024 hidden: ``model.kv_channels``)."""

from megatron_ct.families.spec import HFArchitecture, decoder_family

FAMILY = decoder_family(
    "qwen3",
    "Qwen3 dense (q/k norm, explicit head_dim)",
    (
        HFArchitecture(
            "Qwen3ForCausalLM",
            "qwen3",
            (("attention_bias", False), ("use_sliding_window", False), ("sliding_window", None)),
        ),
    ),
    qk_norm=True,
)
