"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 decoder (q/k norm, explicit head_dim)
with every MLP a mixture of ``num_experts`` SwiGLU experts (HF ``mlp.experts.<e>.gate_proj /
up_proj / down_proj``) of width ``moe_intermediate_size``, ``num_experts_per_tok`` per token.

Routing: a softmax over the experts' logits, the top k kept, renormalised when
``norm_topk_prob`` (``model.moe_norm_topk_prob``). Dense layers between MoE ones
(``decoder_sparse_step`` > 1, ``mlp_only_layers``) are not implemented; the released models have
none. ``intermediate_size`` (the dense MLP width such layers would have) is kept as
``model.ffn_hidden_size``.
"""

from megatron_ct.families.spec import DECODER_CONFIG_KEYS, ConfigKey, HFArchitecture, moe_family, moe_tensors

FAMILY = moe_family(
    "qwen3_moe",
    "Qwen3-MoE (q/k norm, softmax top-k, norm_topk_prob)",
    (
        HFArchitecture(
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            (
                ("attention_bias", False),
                ("use_sliding_window", False),
                ("sliding_window", None),
                ("decoder_sparse_step", 1),
                ("mlp_only_layers", []),
            ),
        ),
    ),
    DECODER_CONFIG_KEYS
    + (
        ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size"),
        ConfigKey("num_experts", "num_experts", also=("num_local_experts",)),
        ConfigKey("moe_norm_topk_prob", "norm_topk_prob", False),
    ),
    (("decoder_sparse_step", 1, 1), ("mlp_only_layers", [], []), ("use_sliding_window", False, False)),
    moe_tensors("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    qk_norm=True,
)
