"""Derive a weights-only checkpoint from another one, streamed tensor slice by slice.

Shared by the offline tools that change a model (block expansion, vocabulary resize,
checkpoint merges): tensors are read from the source's dist checkpoint region by region
(global coordinates: any TP/PP it was saved at) and written through
:func:`megatron_ct.checkpoint.dist_io.write_dist_checkpoint`; the result is a save root
(``iter_0000000`` + tracker, published by :mod:`megatron_ct.checkpoint.root`) that the trainer
loads with ``checkpoint.load_weights_only=true`` at any layout.
"""

from __future__ import annotations

import copy
import dataclasses
import os

from megatron_ct.checkpoint import root as ckpt_root
from megatron_ct.checkpoint.dist_ckpt import SHARDING_METADATA
from megatron_ct.checkpoint.dist_io import ChunkSpec, DistCheckpointReader, write_dist_checkpoint
from megatron_ct.checkpoint.keys import LAYER_PREFIX, extra_state_objects
from megatron_ct.checkpoint.meta import CheckpointMeta, check_dcp_metadata, read_meta
from megatron_ct.checkpoint.verify import check_files, write_manifest
from megatron_ct.errors import ConversionError


def open_checkpoint(ckpt: str, key: str = "--input") -> tuple[str, DistCheckpointReader, CheckpointMeta]:
    """(iteration directory, tensor reader, a copy of its metadata) of a save root or iter_* dir;
    ``key`` names the option it came from in messages."""
    path, _ = ckpt_root.resolve_load_dir(ckpt, key=key)
    meta = read_meta(path)
    check_files(path)  # sizes: a missing or truncated shard is one line here, not a read error later
    check_dcp_metadata(path)
    return path, DistCheckpointReader(path), copy.deepcopy(meta)


def model_keys(reader: DistCheckpointReader) -> list[str]:
    """Model tensors (optimizer state is not carried into a derived checkpoint)."""
    return [k for k in reader.tensors if not k.startswith("optimizer.")]


def copied(reader: DistCheckpointReader, key: str) -> list[ChunkSpec]:
    """``key`` unchanged: one chunk, or one per layer for stacked ``[L, ...]`` tensors."""
    shape, dtype = reader.shape(key), reader.dtype(key)
    if not key.startswith(LAYER_PREFIX):
        return [ChunkSpec(key, shape, (0,) * len(shape), shape, dtype, lambda: reader.read(key))]
    chunks = []
    for layer in range(shape[0]):
        offsets, sizes = (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:])
        chunks.append(ChunkSpec(key, shape, offsets, sizes, dtype, lambda o=offsets, s=sizes: reader.read(key, o, s)))
    return chunks


def write_weights_only(
    out_dir: str, chunks: list[ChunkSpec], meta: CheckpointMeta, overwrite: bool = False, on_written=None
) -> str:
    """Write ``chunks`` as iteration 0 of the save root ``out_dir`` with ``meta`` (whose
    ``config`` must describe the new shapes); the tracker is written last."""
    exists = ckpt_root.read_tracker(out_dir) is not None or os.path.exists(ckpt_root.iter_dir(out_dir, 0))
    if exists and not overwrite:
        raise ConversionError(f"{out_dir}: already holds a checkpoint; pass --overwrite to replace it")
    meta = dataclasses.replace(meta, iteration=0, weights_only=True, state=None)
    partial = ckpt_root.stage(out_dir, 0)
    os.rmdir(partial)  # write_dist_checkpoint creates it
    try:
        write_dist_checkpoint(
            partial,
            chunks,
            extra_state_objects(meta.model),
            {"ct": meta.to_dict(), "content_metadata": dict(SHARDING_METADATA)},
            on_written=on_written,
        )
        write_manifest(partial)
    except BaseException:
        ckpt_root.discard(out_dir, 0)
        raise
    return ckpt_root.publish(out_dir, 0)
