"""Save and load the training state as megatron-core dist checkpoints, resumable and reshardable.

What a checkpoint holds is the :class:`TrainState`: the model chunks, the optimizer, the LR
scheduler and the data source, each saved and restored through its own state dict, plus the
:class:`~megatron_ct.checkpoint.meta.CheckpointMeta` record and the RNG states. Where it goes
on disk (``iter_N.partial`` -> ``iter_N`` -> tracker, retention) is
:mod:`megatron_ct.checkpoint.root`'s.

Tensors are stored in megatron-core's global (unsharded) coordinates, so a checkpoint saved
at one TP/PP/DP layout loads at another. The optimizer is saved in the distributed
optimizer's ``fully_reshardable`` format when that optimizer is used.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_ct.checkpoint import root as ckpt_root
from megatron_ct.checkpoint import verify as verify_files
from megatron_ct.checkpoint.meta import CheckpointMeta, check_dcp_metadata
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


@dataclass
class TrainState:
    """The stateful components of a run (torchtitan's model): saved and restored together."""

    model: list  # DDP-wrapped model chunks
    optimizer: Any = None
    scheduler: Any = None
    data: Any = None  # a megatron_ct.data.batches.DataSource
    evaluator: Any = None  # a megatron_ct.training.evaluate.Evaluator (base-line values)


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _model_sharded_state_dict(chunks) -> dict[str, Any]:
    n = len(chunks)
    return {
        _model_key(i, n): unwrap(c).sharded_state_dict(metadata=dict(SHARDING_METADATA)) for i, c in enumerate(chunks)
    }


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """DDP -> the GPTModel inside."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _rng_sharded(state: dict) -> Any:
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


def _prepare_torch_adam_for_load(optimizer) -> None:
    """Work around megatron-core 0.16.1's distributed optimizer on the torch.optim.Adam
    path (no apex / Transformer Engine, e.g. every CPU run):

    - ``DistributedOptimizer.state_dict()`` asserts that every Adam state has a 'step',
      which a fresh optimizer (nothing stepped yet) does not have; we allocate the state
      with step 0, as megatron-core's own ``init_state_fn`` would plus the step.
    - its ``fully_reshardable`` loader skips 'step' in the checkpoint tensors ("handled
      separately": it is restored from the param groups) but then indexes it when
      copying; we make the copy keep the step already restored.
    Nothing changes when apex or TE provide the fused Adam.
    """
    from megatron.core.optimizer import distrib_optimizer as mdo

    if mdo.HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, mdo.DistributedOptimizer):
            continue
        if opt.init_state_fn is not None:
            opt.init_state_fn(opt.optimizer, opt.config)
        for st in opt.optimizer.state.values():
            st.setdefault("step", torch.tensor(0.0))
        if getattr(opt, "_ct_step_shim", False):
            continue
        original = opt._set_main_param_and_optimizer_states

        def keep_restored_step(model_param, tensors, _opt=opt, _orig=original):
            if "step" not in tensors:
                group_index, group_order = _opt.model_param_group_index_map[model_param]
                main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
                current = _opt.optimizer.state[main_param].get("step")
                if current is not None:
                    tensors = {**tensors, "step": current.clone()}
            return _orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = keep_restored_step
        opt._ct_step_shim = True


def _unshare_torch_adam_steps(optimizer) -> None:
    """megatron-core's distributed optimizer restores torch Adam's 'step' as one tensor
    object shared by every parameter's state; torch increments it in place once per
    parameter, which corrupts Adam's bias correction after a resume. Give each its own."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def save_checkpoint(
    root: str, state: TrainState, meta: CheckpointMeta, keep_last: int | None = None, verify: bool = False
) -> str:
    """Collective: every rank calls it. Writes ``meta.iteration``; returns the final directory.

    A failed write (disk full, an unwritable directory) removes the partial, leaves the
    previous latest checkpoint as it was, and raises :class:`CheckpointError` on every rank.
    """
    from megatron.core import dist_checkpointing

    iteration = meta.iteration
    partial = ckpt_root.iter_dir(root, iteration) + ".partial"
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            ckpt_root.stage(root, iteration)
        except OSError as e:
            error = e
    if _any_rank(error is not None):
        raise CheckpointError(_write_error(root, partial, error))

    model_sd = _model_sharded_state_dict(state.model)
    sd: dict[str, Any] = dict(model_sd)
    sd["optimizer"] = state.optimizer.sharded_state_dict(model_sd, metadata=dict(SHARDING_METADATA))
    sd["scheduler"] = state.scheduler.state_dict()
    sd["rng_state"] = _rng_sharded(_rng_state())
    sd["ct"] = meta.to_dict()
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


def load_weights(load: str, chunks: list, key: str = "checkpoint.load") -> CheckpointMeta:
    """Collective: weights only into ``chunks`` (e.g. for inference or evaluation), from a save
    root or iter_* directory at any saved layout; returns the checkpoint's record."""
    from megatron_ct.checkpoint.meta import read_meta

    path, _ = ckpt_root.resolve_load_dir(load, key)
    meta = read_meta(path)
    load_checkpoint(path, TrainState(chunks), meta, weights_only=True)
    return meta


def load_checkpoint(
    path: str, state: TrainState, meta: CheckpointMeta, weights_only: bool = False, verify: bool = False
) -> None:
    """Collective. Loads weights (always) and, unless ``weights_only``, optimizer, scheduler,
    data position and (at the same layout) RNG states. Works across TP/PP layouts.
    ``path`` and ``meta`` come from the start-up check (``resolve_load_dir`` + ``read_meta``)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    check_checkpoint_files(path, checksums=verify)  # a missing/truncated (or, verified, changed) file: one line
    check_dcp_metadata(path)  # DCP unpickles it: only checkpoint metadata classes may be in it
    model_sd = _model_sharded_state_dict(state.model)
    request: dict[str, Any] = dict(model_sd)
    same_layout = meta.layout == {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
    }
    if not weights_only:
        _prepare_torch_adam_for_load(state.optimizer)
        request["optimizer"] = state.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=dict(SHARDING_METADATA)
        )
        if same_layout:
            request["rng_state"] = _rng_sharded(_rng_state())
    loaded = dist_checkpointing.load(request, path)

    n = len(state.model)
    for i, chunk in enumerate(state.model):
        unwrap(chunk).load_state_dict(loaded[_model_key(i, n)], strict=True)
    if weights_only:
        if state.optimizer is not None:
            # bf16/fp16: the optimizer made its FP32 main copies from the initial weights;
            # without a refresh the first step would write those back over the loaded ones.
            state.optimizer.reload_model_params()
        log.info("loaded weights only from %s (iteration %d); optimizer and schedule start fresh", path, meta.iteration)
        return

    state.optimizer.load_state_dict(loaded["optimizer"])
    _unshare_torch_adam_steps(state.optimizer)
    state.scheduler.load_state_dict(loaded["scheduler"])
    if state.data is not None and meta.data is not None:
        state.data.load_state_dict(meta.data)
    if state.evaluator is not None and meta.evaluation is not None:
        state.evaluator.load_state_dict(meta.evaluation)
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    else:
        log.info("checkpoint layout %s differs from this run's; RNG states not restored", meta.layout)


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
