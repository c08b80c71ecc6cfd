"""LLaMA-Pro block expansion: grow a checkpoint by identity blocks.

After every ``every`` blocks, ``add`` new blocks are inserted. Each new block copies the
block before it, with the attention output projection (``linear_proj``) and the MLP down
projection (``linear_fc2``) zeroed: the block's residual branches then add exactly zero,
so the expanded model computes the same function. Training only the new blocks
(``train.trainable_params=new_blocks``) adds capacity without touching what the base knows.

Works on our dist checkpoints (any TP/PP they were saved at: tensors are stored in global
coordinates), streamed one layer slice at a time. The output holds weights only
(iteration 0) and records the new layers' global indices as ``new_block_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ct.checkpoint.dist_io import ChunkSpec, DistCheckpointReader
from megatron_ct.checkpoint.keys import LAYER_PREFIX
from megatron_ct.checkpoint.rewrite import copied, model_keys, open_checkpoint, write_weights_only
from megatron_ct.errors import ConversionError

# Output projections of the two residual branches: zero them and the block is an identity.
ZEROED = (
    "decoder.layers.self_attention.linear_proj.weight",
    "decoder.layers.mlp.linear_fc2.weight",
    "decoder.layers.self_attention.linear_proj.bias",
    "decoder.layers.mlp.linear_fc2.bias",
)


@dataclass(frozen=True)
class ExpansionPlan:
    """``sources[j]``: the old layer that new-model layer ``j`` copies; ``new[j]``: added."""

    sources: tuple[int, ...]
    new_layers: tuple[int, ...]

    @classmethod
    def make(cls, num_layers: int, every: int, add: int) -> ExpansionPlan:
        if every < 1 or num_layers % every != 0:
            raise ConversionError(f"--every {every}: expected a divisor of the model's {num_layers} layers")
        if add < 1:
            raise ConversionError(f"--add {add}: expected at least 1 new block per group")
        sources, new = [], []
        for group in range(num_layers // every):
            last = group * every + every - 1
            sources.extend(range(group * every, last + 1))
            for _ in range(add):
                new.append(len(sources))
                sources.append(last)  # copy of its predecessor
        return cls(tuple(sources), tuple(new))


def plan_chunks(reader: DistCheckpointReader, plan: ExpansionPlan) -> list[ChunkSpec]:
    chunks = []
    new = set(plan.new_layers)
    for key in model_keys(reader):
        if not key.startswith(LAYER_PREFIX):
            chunks.extend(copied(reader, key))
            continue
        shape, dtype = reader.shape(key), reader.dtype(key)
        out_shape = (len(plan.sources), *shape[1:])
        for j, src in enumerate(plan.sources):
            offsets, sizes = (j,) + (0,) * (len(shape) - 1), (1, *shape[1:])
            zero = j in new and key in ZEROED

            def produce(k=key, s=src, z=zero, sizes=sizes, dtype=dtype) -> torch.Tensor:
                if z:
                    return torch.zeros(sizes, dtype=dtype)
                return reader.read(k, (s,) + (0,) * (len(sizes) - 1), sizes)  # [1, ...] of layer s

            chunks.append(ChunkSpec(key, out_shape, offsets, sizes, dtype, produce))
    return chunks


def expand_blocks(ckpt: str, out_dir: str, every: int, add: int, overwrite: bool = False) -> ExpansionPlan:
    """Write the expanded checkpoint to ``out_dir`` (a save root: ``iter_0000000`` + tracker)."""
    path, reader, meta = open_checkpoint(ckpt)
    num_layers = meta.model["num_layers"]
    if any(reader.shape(k)[0] != num_layers for k in model_keys(reader) if k.startswith(LAYER_PREFIX)):
        raise ConversionError(f"{path}: stacked layer tensors do not have {num_layers} layers")
    plan = ExpansionPlan.make(num_layers, every, add)
    meta.model["num_layers"] = len(plan.sources)
    earlier = [plan.sources.index(i) for i in meta.new_block_layers or []]  # a second expansion keeps them
    meta.new_block_layers = sorted(set(plan.new_layers) | set(earlier))
    meta.expansion = {"source": path, "every": every, "add": add}
    write_weights_only(out_dir, plan_chunks(reader, plan), meta, overwrite)
    return plan
