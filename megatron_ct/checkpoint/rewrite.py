"""Derive a weights-only checkpoint from another one, streamed tensor slice by slice.

Shared by the tools that change a model's shape offline: block expansion (more layers)
and vocabulary resizing (more embedding rows). Tensors are read from the source's dist
checkpoint region by region (global coordinates: any TP/PP it was saved at) and written
through :func:`megatron_ct.checkpoint.dist_io.write_dist_checkpoint`; the result is a save root
(``iter_0000000`` + tracker, tracker written last) that the trainer loads with
``checkpoint.load_weights_only=true`` at any layout.
"""

from __future__ import annotations

import copy
import os
import shutil

import torch

from megatron_ct.checkpoint.dist_ckpt import (
    FORMAT_VERSION,
    SHARDING_METADATA,
    TRACKER,
    iter_dir,
    resolve_load_dir,
    write_tracker,
)
from megatron_ct.checkpoint.dist_io import ChunkSpec, DistCheckpointReader, write_dist_checkpoint
from megatron_ct.checkpoint.keys import LAYER_PREFIX, extra_state_objects
from megatron_ct.errors import ConversionError


def open_checkpoint(ckpt: str) -> tuple[str, DistCheckpointReader, dict]:
    """(iteration directory, tensor reader, a copy of its ``ct`` metadata)."""
    path, _ = resolve_load_dir(ckpt)
    reader = DistCheckpointReader(path)
    common = torch.load(os.path.join(path, "common.pt"), weights_only=False)
    ct = common.get("ct") or {}
    if "config" not in ct:
        raise ConversionError(f"{path}: no megatron-ct metadata (common.pt has no 'ct' config)")
    return path, reader, copy.deepcopy(ct)


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


def write_weights_only(out_dir: str, chunks: list[ChunkSpec], ct: dict, overwrite: bool = False) -> str:
    """Write ``chunks`` as iteration 0 of the save root ``out_dir`` with metadata ``ct``
    (whose ``config`` must describe the new shapes)."""
    final = iter_dir(out_dir, 0)
    if os.path.exists(os.path.join(out_dir, TRACKER)) or os.path.exists(final):
        if not overwrite:
            raise ConversionError(f"{out_dir}: already holds a checkpoint; pass --overwrite to replace it")
        shutil.rmtree(final, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    ct = dict(ct, iteration=0, consumed_samples=0, weights_only=True, format_version=FORMAT_VERSION)
    ct.pop("data", None)  # a data position belongs to the run that made the source
    num_layers = ct["config"]["model"]["num_layers"]
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    write_dist_checkpoint(
        partial, chunks, extra_state_objects(num_layers), {"ct": ct, "content_metadata": dict(SHARDING_METADATA)}
    )
    os.replace(partial, final)
    write_tracker(out_dir, 0)  # last: only now is the checkpoint "latest"
    return final
