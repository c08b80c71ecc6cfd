"""Save and load megatron-core dist checkpoints, resumable and reshardable.

Layout of ``checkpoint.save``::

    iter_0000100/                     one megatron-core dist checkpoint
    latest_checkpointed_iteration.txt "100" (Megatron-LM's tracker name)

A checkpoint is written into ``iter_XXXXXXX.partial`` and renamed, then the tracker is
replaced atomically (write temp, rename). A save killed at any point therefore leaves
the tracker on the previous complete checkpoint; leftover ``.partial`` directories are
removed by the next save.

Tensors are stored in megatron-core's global (unsharded) coordinates, so a checkpoint
saved at one TP/PP/DP layout loads at another. The optimizer is saved in the
distributed optimizer's ``fully_reshardable`` format when that optimizer is used.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_ct.checkpoint.preemption import helpers_ignore_sigterm
from megatron_ct.config import ConfigError

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
# Common-dict keys that record where the weights came from (the HF model a checkpoint was
# converted from, blocks added by expansion, ...); training keeps them in every save so
# later tools (ct -> HF export, train.trainable_params=new_blocks) still find them.
PROVENANCE_KEYS = ("hf", "new_block_layers", "vocab_expansion")
FORMAT_VERSION = 1

# Passed to sharded_state_dict() of model and optimizer and stored with the checkpoint.
# Always pass a copy: megatron-core adds process groups to the dict it is given.
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int | None:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, got {text!r}")
    return int(text)


def resolve_load_dir(load: str) -> tuple[str, int]:
    """``load`` may be a save root (follow its tracker) or one ``iter_*`` directory."""
    if not os.path.exists(load):
        raise FileNotFoundError(f"checkpoint.load: {load} does not exist")
    it = read_tracker(load)
    if it is not None:
        path = iter_dir(load, it)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"checkpoint.load: {os.path.join(load, TRACKER)} names iteration {it} but {path} is missing"
            )
        return path, it
    if os.path.isfile(os.path.join(load, "metadata.json")):
        name = os.path.basename(os.path.normpath(load))
        return load, int(name.split("_")[-1]) if name.startswith("iter_") else 0
    raise FileNotFoundError(f"checkpoint.load: {load} has neither {TRACKER} nor a dist checkpoint (metadata.json)")


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
    root: str, iteration: int, chunks, optimizer, scheduler, common: dict[str, Any], keep_last: int | None = None
) -> str:
    """Collective: every rank calls it. Returns the final directory."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    final = iter_dir(root, iteration)
    partial = final + ".partial"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of interrupted saves
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        if os.path.exists(final):  # re-saving the same iteration (e.g. end == interval)
            shutil.rmtree(final)
        os.makedirs(partial)
    dist.barrier()

    model_sd = _model_sharded_state_dict(chunks)
    state: dict[str, Any] = dict(model_sd)
    state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=dict(SHARDING_METADATA))
    state["scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_sharded(_rng_state())
    state["ct"] = dict(
        common,
        iteration=iteration,
        format_version=FORMAT_VERSION,
        layout={"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size()},
    )
    with helpers_ignore_sigterm():  # SLURM signals every process of the job, save helpers too
        dist_checkpointing.save(state, partial, content_metadata=dict(SHARDING_METADATA))
    dist.barrier()
    if dist.get_rank() == 0:
        os.replace(partial, final)
        write_tracker(root, iteration)
        if keep_last:
            _prune(root, keep_last)
    dist.barrier()
    return final


def write_tracker(root: str, iteration: int) -> None:
    """Atomically point ``latest_checkpointed_iteration.txt`` at ``iteration`` (temp, fsync,
    rename): call only once that checkpoint is complete."""
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))


def _prune(root: str, keep_last: int) -> None:
    iters = sorted(n for n in os.listdir(root) if n.startswith("iter_") and n[5:].isdigit())
    for name in iters[:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


@dataclass
class LoadedState:
    iteration: int
    consumed_samples: int
    common: dict[str, Any]


def read_common(path: str) -> dict[str, Any]:
    """The checkpoint's plain metadata (config, vocab sizes, iteration), without tensors."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(path)
    return common.get("ct", {})


def load_checkpoint(
    load: str,
    chunks,
    optimizer=None,
    scheduler=None,
    weights_only: bool = False,
    expected_vocab_size: int | None = None,
) -> LoadedState:
    """Collective. Loads weights (always) and, unless weights_only, optimizer, scheduler,
    RNG and data position. Works across TP/PP layouts."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    path, iteration = resolve_load_dir(load)
    common = read_common(path)
    saved_vocab = common.get("model_info", {}).get("true_vocab_size")
    if expected_vocab_size is not None and saved_vocab is not None and saved_vocab != expected_vocab_size:
        raise ConfigError(
            f"model.vocab_size: expected {saved_vocab} (the vocabulary of checkpoint {path}), got {expected_vocab_size}"
        )
    if common.get("weights_only") and not weights_only:
        raise ConfigError(
            f"checkpoint.load_weights_only: expected true for {path}, which holds weights only "
            "(a converted or expanded model: no optimizer state to resume)"
        )
    model_sd = _model_sharded_state_dict(chunks)
    request: dict[str, Any] = dict(model_sd)
    same_layout = common.get("layout") == {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
    }
    if not weights_only:
        _prepare_torch_adam_for_load(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=dict(SHARDING_METADATA))
        if same_layout:
            request["rng_state"] = _rng_sharded(_rng_state())
    loaded = dist_checkpointing.load(request, path)

    n = len(chunks)
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[_model_key(i, n)], strict=True)
    if weights_only:
        if optimizer is not None:
            # bf16/fp16: the optimizer made its FP32 main copies from the initial weights;
            # without a refresh the first step would write those back over the loaded ones.
            optimizer.reload_model_params()
        log.info("loaded weights only from %s (iteration %d); optimizer and schedule start fresh", path, iteration)
        return LoadedState(iteration=0, consumed_samples=0, common=common)

    optimizer.load_state_dict(loaded["optimizer"])
    _unshare_torch_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    else:
        log.info("checkpoint layout %s differs from this run's; RNG states not restored", common.get("layout"))
    return LoadedState(iteration=iteration, consumed_samples=int(common.get("consumed_samples", 0)), common=common)


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
