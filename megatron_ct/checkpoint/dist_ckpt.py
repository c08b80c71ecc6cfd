"""Dist checkpoint I/O under the checkpoint manager: one collective write and one read of a
megatron-core dist checkpoint, with what makes them safe and resumable.

:mod:`megatron_ct.checkpoint.manager` decides what goes in (the registered components); this
module writes it (``iter_N.partial``, the manifest, publish; a failed write leaves the previous
checkpoint as it was and raises one line on every rank) and reads it (files and metadata checked
first). It also holds the RNG state helpers.

Tensors are stored in megatron-core's global (unsharded) coordinates, so a checkpoint saved
at one TP/PP/DP layout loads at another. The optimizer is saved in the distributed
optimizer's ``fully_reshardable`` format when that optimizer is used.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from megatron_ct.checkpoint import root as ckpt_root
from megatron_ct.checkpoint import verify as verify_files
from megatron_ct.checkpoint.meta import check_dcp_metadata
from megatron_ct.checkpoint.preemption import helpers_ignore_sigterm
from megatron_ct.errors import CheckpointError

log = logging.getLogger(__name__)

# Passed to sharded_state_dict() of model and optimizer and stored with the checkpoint.
# Always pass a copy: megatron-core adds process groups to the dict it is given.
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """DDP -> the GPTModel inside."""
    while hasattr(module, "module"):
        module = module.module
    return module


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def rng_sharded(state: dict) -> Any:
    """RNG states differ per (PP, TP) rank and are replicas across DP."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def write(root: str, iteration: int, sd: dict[str, Any], keep_last: int | None = None, verify: bool = False) -> str:
    """Collective: every rank calls it with its sharded state dict ``sd``. Writes iteration
    ``iteration`` of the save root; returns the final directory.

    A failed write (disk full, an unwritable directory) removes the partial, leaves the
    previous latest checkpoint as it was, and raises :class:`CheckpointError` on every rank.
    """
    from megatron.core import dist_checkpointing

    partial = ckpt_root.iter_dir(root, iteration) + ".partial"
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            ckpt_root.stage(root, iteration)
        except OSError as e:
            error = e
    if _any_rank(error is not None):
        raise CheckpointError(_write_error(root, partial, error))

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with helpers_ignore_sigterm():  # SIGTERM to the whole job must not kill the writer's helpers
            dist_checkpointing.save(sd, partial, content_metadata=dict(SHARDING_METADATA))
    except (Exception, CheckpointException) as e:  # DCP's per-rank failures (ENOSPC...) are a BaseException
        error = e
    if error is None:
        try:  # every file's size (and, with verify, its checksum) recorded in the checkpoint
            _write_manifest(partial, verify)
        except OSError as e:
            error = e
    if _any_rank(error is not None):
        if dist.get_rank() == 0:
            ckpt_root.discard(root, iteration)
        dist.barrier()
        raise CheckpointError(_write_error(root, partial, error))
    if dist.get_rank() == 0:
        ckpt_root.publish(root, iteration, keep_last)
    dist.barrier()
    return ckpt_root.iter_dir(root, iteration)


def _write_manifest(partial: str, checksums: bool) -> None:
    """Collective (after every rank's files are written): rank 0 records the file list."""
    sums = None
    if checksums:
        mine = verify_files.hash_share(partial, dist.get_rank(), dist.get_world_size())
        shares: list = [None] * dist.get_world_size()
        dist.all_gather_object(shares, mine)
        sums = {k: v for share in shares for k, v in share.items()}
    if dist.get_rank() == 0:
        verify_files.write_manifest(partial, sums)
    dist.barrier()


def _any_rank(flag: bool) -> bool:
    """Collective: True on every rank if ``flag`` is True on any."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _is_no_space(error: BaseException | None, depth: int = 0) -> bool:
    """ENOSPC anywhere in an exception, its causes, or DCP's per-rank failures."""
    if error is None or depth > 8:
        return False
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in str(error):
        return True
    # torch's zip writer reports a short write as "unexpected pos" without the errno.
    if "inline_container" in str(error) and "unexpected pos" in str(error):
        return True
    nested = getattr(error, "failures", None)  # torch DCP's CheckpointException: {rank: exception}
    if isinstance(nested, dict) and any(_is_no_space(e, depth + 1) for e in nested.values()):
        return True
    return _is_no_space(error.__cause__ or error.__context__, depth + 1)


def _write_error(root: str, partial: str, error: BaseException | None) -> str:
    exists = os.path.isdir(root)
    free = shutil.disk_usage(root).free if exists else None
    latest = ckpt_root.read_tracker(root) if exists else None
    kept = f"; the previous checkpoint (iteration {latest}) is intact" if latest is not None else ""
    if _is_no_space(error) or (free is not None and free < 16 * 2**20):
        return f"checkpoint.save: no space left on device writing {partial} ({free or 0} bytes free){kept}"
    what = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}" if error else "unknown error"
    return f"checkpoint.save: writing {partial} failed ({what}){kept}"


def check_checkpoint_files(path: str, checksums: bool = False) -> None:
    """Collective when distributed: every listed file present with its size (and, with
    ``checksums``, this rank's share of the digests); every rank raises the same one line."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    message = None
    try:
        verify_files.check_files(path, checksums, rank, world)
    except CheckpointError as e:
        message = str(e)
    if distributed:
        messages: list = [None] * world
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m), None)
    if message:
        raise CheckpointError(message)


def read(path: str, request: dict[str, Any], verify: bool = False) -> dict[str, Any]:
    """Collective: the files of ``path`` checked (sizes; checksums with ``verify``) and its DCP
    metadata admitted, then ``request`` (a sharded state dict) loaded; returns what was loaded
    plus the common (non-sharded) state."""
    from megatron.core import dist_checkpointing

    check_checkpoint_files(path, checksums=verify)  # a missing/truncated (or, verified, changed) file: one line
    check_dcp_metadata(path)  # DCP unpickles it: only checkpoint metadata classes may be in it
    return dist_checkpointing.load(request, path)


def restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
