"""LLaMA (1-3.x), SmolLM/SmolLM2 and Mistral: RMSNorm, SwiGLU, RoPE, GQA, no biases.

Mistral's checkpoints are LLaMA's tensor for tensor; its ``sliding_window`` is not implemented
(full causal attention), which the converter reports when the window is shorter than the context.
"""

from megatron_ct.families.spec import HFArchitecture, decoder_family

FAMILY = decoder_family(
    "llama",
    "LLaMA 1-3.x, SmolLM/SmolLM2, Mistral",
    (
        HFArchitecture("LlamaForCausalLM", "llama", (("attention_bias", False), ("mlp_bias", False))),
        HFArchitecture("MistralForCausalLM", "mistral", (("sliding_window", None),)),
    ),
)
