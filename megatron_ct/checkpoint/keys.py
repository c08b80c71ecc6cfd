"""Names of the model tensors in our checkpoints (megatron-core's GPTModel state-dict keys).

Layers are stored stacked, ``decoder.layers.<module>`` with a leading ``[num_layers]`` axis,
in global (TP1/PP1) coordinates; see :mod:`megatron_ct.checkpoint.dist_io`.
"""

from __future__ import annotations

import io

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
LAYER_PREFIX = "decoder.layers."
VOCAB_MATRICES = (EMBEDDING, OUTPUT)


def extra_state_objects(model: dict) -> dict[str, bytes]:
    """The empty ``_extra_state`` objects megatron-core's local linear layers save (one per linear
    module per layer) for the model config dict ``model``, serialised under megatron-core's
    ShardedObject keys (``key/shard_<i>_<n>``)."""
    import torch

    from megatron_ct.config import ModelConfig
    from megatron_ct.families import family_of

    m = ModelConfig(**model)
    buf = io.BytesIO()
    torch.save([None], buf)
    empty = buf.getvalue()
    family = family_of(m)
    out = {
        f"{LAYER_PREFIX}{mod}._extra_state/shard_{i}_{m.num_layers}": empty
        for i in range(m.num_layers)
        for mod in family.linear_modules(m)
    }
    # An expert's linear modules: one object per (layer, expert), offsets and shape dot-joined.
    out.update(
        {
            f"{LAYER_PREFIX}{mod}._extra_state/shard_{i}.{e}_{m.num_layers}.{m.num_experts}": empty
            for i in range(m.num_layers)
            for e in range(m.num_experts or 0)
            for mod in family.linear_modules(m, per_expert=True)
        }
    )
    return out
