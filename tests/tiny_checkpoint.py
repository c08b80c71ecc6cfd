"""Tiny random megatron-ct checkpoints written directly (no trainer run), for offline-tool tests.

Tensors have the names and global shapes the trainer saves (the family's ``ct_shapes``)
and the ``ct`` metadata it records, so the trainer loads them with
``checkpoint.load_weights_only=true`` like a converted model.
"""

from __future__ import annotations

import zlib

import torch

from megatron_ct.checkpoint.dist_io import ChunkSpec, DistCheckpointReader
from megatron_ct.checkpoint.keys import LAYER_PREFIX
from megatron_ct.checkpoint.meta import CheckpointMeta
from megatron_ct.checkpoint.rewrite import model_keys, open_checkpoint, write_weights_only
from megatron_ct.config import CTConfig, ModelConfig, config_to_dict
from megatron_ct.families import family_of
from megatron_ct.model.llama import padded_vocab_size

# tests/launch.py's TINY model.
TINY_MODEL = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 128,
    "vocab_size": 500,
    "max_position_embeddings": 64,
}


def _random(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    t = torch.randn(shape, generator=g)
    if key.endswith("norm_weight") or key.endswith("layernorm.weight"):
        t = 1 + 0.1 * t  # norm weights sit around 1
    else:
        t = 0.05 * t
    return t.to(dtype)


def _layer_chunks(shapes: dict, dtype, make) -> list[ChunkSpec]:
    """Chunks stored the way the trainer and the converter store them: a stacked ``[L, ...]``
    tensor one layer per chunk, others whole. ``make(key, shape, dtype)`` builds a tensor."""
    chunks = []
    for k, s in shapes.items():
        dt = dtype[k] if isinstance(dtype, dict) else dtype
        full = make(k, s, dt)
        if not k.startswith(LAYER_PREFIX):
            chunks.append(ChunkSpec(k, s, (0,) * len(s), s, dt, lambda t=full: t))
            continue
        for i in range(s[0]):
            off, size = (i,) + (0,) * (len(s) - 1), (1, *s[1:])
            chunks.append(ChunkSpec(k, s, off, size, dt, lambda t=full, i=i: t[i : i + 1].clone()))
    return chunks


def write_random_checkpoint(
    out_dir, seed: int, model: dict | None = None, *, dtype=torch.float32, ct_extra: dict | None = None, **model_kw
) -> str:
    """A save root holding iteration 0 of a random model (``TINY_MODEL`` updated by ``model_kw``)."""
    m = ModelConfig(**{**TINY_MODEL, **(model or {}), **model_kw})
    padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1)
    chunks = _layer_chunks(family_of(m).ct_shapes(m, padded), dtype, lambda k, s, dt: _random(k, s, seed, dt))
    meta = CheckpointMeta(
        config=config_to_dict(CTConfig(model=m)),
        true_vocab_size=m.vocab_size,
        padded_vocab_size=padded,
        **(ct_extra or {}),
    )
    write_weights_only(str(out_dir), chunks, meta)
    return str(out_dir)


def write_like(ref, out_dir, seed: int, edit=None) -> str:
    """Random tensors with the names, shapes, dtypes and metadata of checkpoint ``ref``;
    ``edit(key, tensor)`` may change each tensor before it is written."""
    _, reader, meta = open_checkpoint(str(ref))
    shapes = {k: reader.shape(k) for k in model_keys(reader)}

    def make(k, s, dt):
        t = _random(k, s, seed, dt)
        return edit(k, t) if edit else t

    chunks = _layer_chunks(shapes, {k: reader.dtype(k) for k in shapes}, make)
    write_weights_only(str(out_dir), chunks, meta)
    return str(out_dir)


def read_all(ckpt) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint (save root or iter_* directory), whole."""
    path, reader, _ = open_checkpoint(str(ckpt))
    return {k: reader.read(k) for k in model_keys(reader)}


def reader_of(ckpt) -> DistCheckpointReader:
    return open_checkpoint(str(ckpt))[1]
