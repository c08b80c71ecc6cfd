"""Qwen2 and Qwen2.5: the LLaMA decoder with a bias on the q/k/v projections (o_proj and the MLP
have none), often with tied embeddings (the small models)."""

from megatron_ct.families.spec import (
    DECODER_CONFIG_KEYS,
    DECODER_TENSORS,
    SWIGLU_NO_BIAS,
    HFArchitecture,
    ModelFamily,
)

FAMILY = ModelFamily(
    name="qwen2",
    description="Qwen2, Qwen2.5 (QKV bias)",
    architectures=(
        HFArchitecture("Qwen2ForCausalLM", "qwen2", (("use_sliding_window", False), ("sliding_window", None))),
    ),
    config_keys=DECODER_CONFIG_KEYS,
    # Qwen2's config.json has no attention_bias key: its QKV bias comes with the architecture.
    hf_requires=SWIGLU_NO_BIAS,
    tensors_table=DECODER_TENSORS,
    qkv_bias=True,
)
