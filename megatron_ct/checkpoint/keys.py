"""Names of the model tensors in our checkpoints (megatron-core's GPTModel state-dict keys).

Layers are stored stacked, ``decoder.layers.<module>`` with a leading ``[num_layers]`` axis,
in global (TP1/PP1) coordinates; see :mod:`megatron_ct.checkpoint.dist_io`.
"""

from __future__ import annotations

import io

import torch

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
LAYER_PREFIX = "decoder.layers."
VOCAB_MATRICES = (EMBEDDING, OUTPUT)

# megatron-core's local linear layers save an (empty) ``_extra_state`` object per layer.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def extra_state_objects(num_layers: int) -> dict[str, bytes]:
    """The empty ``_extra_state`` objects a checkpoint of ``num_layers`` local layers holds,
    serialised under megatron-core's ShardedObject keys (``key/shard_<i>_<n>``)."""
    buf = io.BytesIO()
    torch.save([None], buf)
    empty = buf.getvalue()
    return {
        f"{LAYER_PREFIX}{mod}._extra_state/shard_{i}_{num_layers}": empty
        for i in range(num_layers)
        for mod in EXTRA_STATE_MODULES
    }
