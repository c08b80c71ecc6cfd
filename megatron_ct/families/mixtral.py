"""Mixtral (8x7B, 8x22B): the Mistral decoder with every MLP a mixture of ``num_local_experts``
SwiGLU experts (HF ``block_sparse_moe.experts.<e>.w1/w3/w2``: gate, up, down) of width
``intermediate_size``, ``num_experts_per_tok`` of them per token.

Routing: a softmax over the experts' logits, the top k kept and renormalised to sum to 1 (always:
Mixtral has no ``norm_topk_prob``), i.e. megatron-core's softmax of the top-k logits. HF's
``router_jitter_noise`` (training-time noise on the MLP input) is not implemented (0 required).
"""

from megatron_ct.families.spec import DECODER_CONFIG_KEYS, ConfigKey, HFArchitecture, moe_family, moe_tensors

FAMILY = moe_family(
    "mixtral",
    "Mixtral (MoE: softmax top-k, renormalised)",
    (HFArchitecture("MixtralForCausalLM", "mixtral", (("sliding_window", None), ("router_jitter_noise", 0.0))),),
    # Mixtral's intermediate_size is the expert's width (there is no dense MLP): read into both
    # widths, written from the expert's.
    DECODER_CONFIG_KEYS
    + (
        ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
        ConfigKey("num_experts", "num_local_experts"),
    ),
    (("router_jitter_noise", 0.0, 0.0),),
    moe_tensors("block_sparse_moe", "gate", ("w1", "w3", "w2")),
    fixed=(("moe_norm_topk_prob", True),),
)
