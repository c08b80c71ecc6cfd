"""megatron-core dist checkpoints (``torch_dist`` backend), streamed.

megatron-core's own ``dist_checkpointing.save`` takes a state dict of every tensor at once
(and its async writer copies them all before writing), so converting through it holds
the whole model. The on-disk format, though, is plain PyTorch DCP plus two megatron files:

- ``.metadata`` + ``__*.distcp``: a DCP checkpoint whose tensor keys are megatron-core's
  sharded keys, in global shape (layers stacked: ``[L, ...]``), stored as any set of chunks
  that tiles each tensor; loading reshards to whatever TP/PP asks;
- ``common.pt``: ``torch.save`` of the non-tensor state (our ``ct`` dict);
- ``metadata.json``: backend names and versions.

:func:`write_dist_checkpoint` drives DCP's ``FileSystemWriter`` with a planner that lists
the chunks up front (key, global shape, offset, size, dtype) and produces each one only when
the writer asks for it, one file per chunk, so one chunk is in memory at a time.
:class:`DistCheckpointReader` reads any region of a stored tensor through DCP's reader,
touching only the chunks that overlap it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ct.errors import ConversionError


@dataclass(frozen=True)
class ChunkSpec:
    """One stored piece of a checkpoint tensor, produced on demand."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    """Returns the chunk, shape ``sizes`` (or the same elements without leading 1-axes)."""

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class _StreamingSavePlanner(SavePlanner):
    """A single-process DCP save plan whose tensors are produced at write time."""

    def __init__(
        self, chunks: list[ChunkSpec], objects: dict[str, bytes], on_written: Callable[[ChunkSpec], None] | None = None
    ) -> None:
        self._chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        self._objects = objects
        self._on_written = on_written
        self.plan: SavePlan | None = None

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = True) -> None:
        pass  # everything comes from the chunk list

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self._chunks.values()
        ]
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._objects]
        self.plan = SavePlan(items)
        return self.plan

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        plans, metadata = create_default_global_save_plan(all_plans)
        _check_tiling(metadata)
        return plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        self.plan = new_plan
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[write_item.index.fqn])
        spec = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = spec.produce()
        if tensor.numel() != torch.Size(spec.sizes).numel() or tensor.dtype != spec.dtype:
            raise ConversionError(
                f"{spec.key} at offset {spec.offsets}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {spec.sizes} {spec.dtype}"
            )
        if self._on_written is not None:
            self._on_written(spec)
        return tensor.reshape(spec.sizes).contiguous()


def _check_tiling(metadata: Metadata) -> None:
    """Every tensor's chunks must add up to its whole volume (each chunk lies inside it)."""
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        total = torch.Size(md.size).numel()
        covered = 0
        for c in md.chunks:
            if any(o + s > d for o, s, d in zip(c.offsets, c.sizes, md.size, strict=True)):
                raise ConversionError(
                    f"{key}: chunk at {tuple(c.offsets)} size {tuple(c.sizes)} exceeds {tuple(md.size)}"
                )
            covered += torch.Size(c.sizes).numel()
        if covered != total:
            raise ConversionError(f"{key}: chunks cover {covered} of {total} elements")


def write_dist_checkpoint(
    path: str,
    chunks: list[ChunkSpec],
    objects: dict[str, bytes],
    common: dict,
    on_written: Callable[[ChunkSpec], None] | None = None,
) -> None:
    """Write a megatron-core dist checkpoint into the (new) directory ``path``.

    ``objects`` are megatron ShardedObjects by unique key (``key/shard_<offset>_<shape>``),
    already serialised; ``common`` becomes ``common.pt``. No process group is needed.
    """
    from megatron.core.dist_checkpointing.core import save_config

    from megatron_ct.compat import checkpointing_config

    os.makedirs(path)
    # One file per chunk: DCP keeps every tensor of a file referenced until the file is
    # closed, so one file per rank would hold the model in memory.
    writer = FileSystemWriter(path, single_file_per_rank=False, thread_count=1, sync_files=True)
    with warnings.catch_warnings():
        # Single process by design; DCP warns that no process group is set up.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_save({}, storage_writer=writer, planner=_StreamingSavePlanner(chunks, objects, on_written), no_dist=True)
    torch.save(common, os.path.join(path, "common.pt"))
    save_config(checkpointing_config("torch_dist", 1), path)


class _RegionLoadPlanner:
    """What DCP's reader calls back into: where each piece read goes in ``out``."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out

    def resolve_tensor(self, read_item):
        view = self.out
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            view = view.narrow(dim, offset, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor returned a view of `out`; the reader copied into it

    def load_bytes(self, read_item, value) -> None:  # pragma: no cover - tensors only
        raise RuntimeError("region reads are for tensors")


class DistCheckpointReader:
    """Tensor metadata and region reads of one dist checkpoint directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader = FileSystemReader(path)
        try:
            self.metadata = self._reader.read_metadata()
        except FileNotFoundError:
            raise ConversionError(f"{path}: missing .metadata (not a torch_dist dist checkpoint)") from None
        self._reader.set_up_storage_reader(self.metadata, True)
        self.tensors = {
            k: md for k, md in self.metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)
        }

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(
        self, key: str, offsets: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of tensor ``key`` (whole tensor by default)."""
        md = self.tensors[key]
        offsets = tuple(offsets or (0,) * len(md.size))
        sizes = tuple(sizes or md.size)
        out = torch.empty(sizes, dtype=md.properties.dtype)
        items = create_read_items_for_chunk_list(
            key, md, [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))]
        )
        got = sum(torch.Size(it.lengths).numel() for it in items)
        if got != out.numel():
            raise ConversionError(
                f"{self.path}: tensor {key} region {offsets}+{sizes} is only partly stored "
                f"({got} of {out.numel()} elements)"
            )
        self._reader.read_data(LoadPlan(items), _RegionLoadPlanner(out)).wait()
        return out
