"""Qwen2 and Qwen2.5: the LLaMA decoder with a bias on the q/k/v projections (o_proj and the MLP
have none), often with tied embeddings (the small models). Its config.json has no attention_bias
key: the QKV bias comes with the architecture."""

from megatron_ct.families.spec import HFArchitecture, decoder_family

FAMILY = decoder_family(
    "qwen2",
    "Qwen2, Qwen2.5 (QKV bias)",
    (HFArchitecture("Qwen2ForCausalLM", "qwen2", (("use_sliding_window", False), ("sliding_window", None))),),
    qkv_bias=True,
)
