"""The one checkpoint manager: a run registers its stateful components once, by name; saving and
loading walk the registrations.

A component is anything with ``state_dict()`` / ``load_state_dict(state)`` (the LR scheduler, the
data source, the evaluator's base line, the curriculum stage, ...): its state is plain data and
is stored in the checkpoint's metadata record (``common.pt['ct']['state'][name]``). The model,
the optimizer and the RNG states are sharded across ranks and go through megatron-core's dist
checkpointing instead (:class:`ModelState`, :class:`OptimizerState`, :class:`RNGState`), in
global coordinates, so a checkpoint loads at any TP/PP/DP layout. Adding a component to every
checkpoint is one :meth:`CheckpointManager.register` call.

Where a checkpoint goes on disk (``iter_N.partial`` -> ``iter_N`` -> tracker, retention) is
:mod:`megatron_ct.checkpoint.root`'s; its file list and checksums :mod:`~.verify`'s; the metadata
record :class:`~megatron_ct.checkpoint.meta.CheckpointMeta`'s. Format 2 checkpoints (the data
position and base line beside the record, the scheduler beside it in ``common.pt``) load as
they are; anything older resumes only its weights (one line naming the format).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from torch.distributed.checkpoint.api import CheckpointException

from megatron_ct.checkpoint import dist_ckpt
from megatron_ct.checkpoint.meta import CheckpointMeta
from megatron_ct.compat import prepare_torch_adam_for_load, unshare_torch_adam_steps
from megatron_ct.errors import CTError

log = logging.getLogger(__name__)


class Stateful(Protocol):
    """What a plain component is: its state as plain data (numbers, strings, lists, dicts)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardedComponent(Protocol):
    """A component stored through megatron-core's dist checkpointing (sharded across ranks)."""

    weights: bool
    """Loaded with ``load_weights_only`` too (the model); else only when resuming."""

    def sharded_state_dict(self, ctx: dict[str, Any], loading: bool) -> Any | None:
        """What to save or request under the component's name; None: nothing (this time)."""

    def load_sharded(self, loaded: Any, ctx: dict[str, Any]) -> None: ...


class ModelState:
    """The model chunks (DDP-wrapped or not): ``model`` or ``model0``, ``model1``... (VPP)."""

    weights = True

    def __init__(self, chunks: list) -> None:
        self.chunks = chunks

    def keys(self) -> list[str]:
        n = len(self.chunks)
        return ["model" if n == 1 else f"model{i}" for i in range(n)]

    def sharded_state_dict(self, ctx: dict[str, Any], loading: bool) -> dict[str, Any]:
        sd = {
            k: dist_ckpt.unwrap(c).sharded_state_dict(metadata=dict(dist_ckpt.SHARDING_METADATA))
            for k, c in zip(self.keys(), self.chunks, strict=True)
        }
        ctx["model_sd"] = sd  # the optimizer's state is keyed by these
        return sd

    def load_sharded(self, loaded: dict[str, Any], ctx: dict[str, Any]) -> None:
        for k, chunk in zip(self.keys(), self.chunks, strict=True):
            dist_ckpt.unwrap(chunk).load_state_dict(loaded[k], strict=True)


class OptimizerState:
    """megatron-core's (distributed) optimizer, in the ``fully_reshardable`` format.

    ``settings`` maps a config dict (this run's, or the one a checkpoint recorded) to the
    settings that shape the optimizer's parameters and groups; when loading the saved state
    fails and those settings changed since the save, the failure is that change, said in one
    line (megatron-core reports a missing key or a list length)."""

    weights = False

    def __init__(self, optimizer, settings: Callable[[dict], dict] | None = None, config: dict | None = None) -> None:
        self.optimizer = optimizer
        self.settings, self.config = settings, config

    def explain_load_failure(self, meta: CheckpointMeta, path: str) -> None:
        """Raise the one-line error when the optimizer settings differ from the checkpoint's."""
        if self.settings is None or self.config is None:
            return
        saved, here = self.settings(meta.config or {}), self.settings(self.config)
        changed = [k for k in sorted(set(saved) | set(here)) if saved.get(k) != here.get(k)]
        if changed:
            from megatron_ct.errors import CheckpointError

            key = changed[0]
            raise CheckpointError(
                f"{key}: expected {saved.get(key)!r} as when {path} was saved (now {here.get(key)!r}"
                + (f"; also {', '.join(changed[1:])}" if changed[1:] else "")
                + "): its optimizer state holds the parameters and groups of those settings; or start from its "
                "weights with checkpoint.load_weights_only=true"
            )

    def sharded_state_dict(self, ctx: dict[str, Any], loading: bool) -> Any:
        if loading:
            check_expert_optimizer_layout(ctx["meta"], ctx.get("path", "the checkpoint"))
            prepare_torch_adam_for_load(self.optimizer)
        return self.optimizer.sharded_state_dict(
            ctx["model_sd"], is_loading=loading, metadata=dict(dist_ckpt.SHARDING_METADATA)
        )

    def load_sharded(self, loaded: Any, ctx: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(loaded)
        unshare_torch_adam_steps(self.optimizer)


def check_expert_optimizer_layout(meta: CheckpointMeta, path: str) -> None:
    """megatron-core gives a mixture of experts' expert parameters their own optimizer (a
    ChainedOptimizer of two) only when EP > 1; at EP 1 they share the dense one. The saved
    optimizer state has the shape of one of the two, so resuming it on the other side of EP 1
    is refused here, in one line, before megatron-core fails on a missing key."""
    from megatron.core import parallel_state as ps

    if not meta.model.get("num_experts"):
        return
    saved = (meta.config.get("parallel") or {}).get("expert_model_parallel_size", 1)
    here = ps.get_expert_model_parallel_world_size()
    if (saved > 1) != (here > 1):
        from megatron_ct.errors import CheckpointError

        expected = "> 1" if saved > 1 else "1"
        raise CheckpointError(
            f"parallel.expert_model_parallel_size: expected {expected} to resume {path} (saved at EP {saved}; "
            f"megatron-core keeps the experts' optimizer state apart only when EP > 1), got {here}; or start "
            "from its weights with checkpoint.load_weights_only=true"
        )


class RNGState:
    """torch, CUDA and megatron-core's tensor-parallel RNG states: per (PP, TP) rank, replicas
    across DP; restored only at the layout they were saved at."""

    weights = False

    def sharded_state_dict(self, ctx: dict[str, Any], loading: bool) -> Any | None:
        if loading and not ctx["same_layout"]:
            log.info("checkpoint layout %s differs from this run's; RNG states not restored", ctx["meta"].layout)
            return None
        return dist_ckpt.rng_sharded(dist_ckpt.rng_state())

    def load_sharded(self, loaded: Any, ctx: dict[str, Any]) -> None:
        dist_ckpt.restore_rng(loaded)


# Format 2 kept the LR scheduler's state beside the metadata record in ``common.pt`` (the data
# position and base line, inside the record, CheckpointMeta.from_dict moves into ``state``).
_FORMAT_2_COMMON = ("scheduler",)


class CheckpointManager:
    """Saves and loads the registered components of a run as one checkpoint."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def register(self, name: str, component: Any) -> None:
        """Add ``component`` (a :class:`Stateful` or a :class:`ShardedComponent`) under ``name``."""
        if name in self.components:
            raise ValueError(f"checkpoint component {name!r} registered twice")
        self.components[name] = component

    def _sharded(self) -> dict[str, Any]:
        return {n: c for n, c in self.components.items() if hasattr(c, "sharded_state_dict")}

    def _plain(self) -> dict[str, Any]:
        return {n: c for n, c in self.components.items() if not hasattr(c, "sharded_state_dict")}

    # --- save ------------------------------------------------------------------------------------
    def save(self, root: str, meta: CheckpointMeta, keep_last: int | None = None, verify: bool = False) -> str:
        """Collective. Writes iteration ``meta.iteration`` of the save root; returns its directory."""
        ctx: dict[str, Any] = {"meta": meta}
        sd: dict[str, Any] = {}
        for name, c in self._sharded().items():
            part = c.sharded_state_dict(ctx, loading=False)
            if isinstance(c, ModelState):
                sd.update(part)  # the model's keys are megatron-core's, at the top level
            elif part is not None:
                sd[name] = part
        state = {name: c.state_dict() for name, c in self._plain().items()}
        sd["ct"] = replace(meta, state=state).to_dict()
        return dist_ckpt.write(root, meta.iteration, sd, keep_last=keep_last, verify=verify)

    # --- load ------------------------------------------------------------------------------------
    def load(self, path: str, meta: CheckpointMeta, weights_only: bool = False, verify: bool = False) -> None:
        """Collective. The model always; with ``weights_only`` nothing else (the optimizer's main
        copies are refreshed from the loaded weights), else every registered component. Works
        across TP/PP layouts. ``path`` and ``meta`` come from the start-up check."""
        from megatron.core import parallel_state as ps

        same_layout = meta.layout == {
            "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
        }
        ctx: dict[str, Any] = {"meta": meta, "same_layout": same_layout, "path": path}
        request: dict[str, Any] = {}
        wanted = {n: c for n, c in self._sharded().items() if c.weights or not weights_only}
        for name, c in wanted.items():
            part = c.sharded_state_dict(ctx, loading=True)
            if isinstance(c, ModelState):
                request.update(part)
            elif part is not None:
                request[name] = part
        try:
            loaded = dist_ckpt.read(path, request, verify=verify)
            for name, c in wanted.items():
                if isinstance(c, ModelState):
                    c.load_sharded(loaded, ctx)
                elif name in loaded and name in request:
                    c.load_sharded(loaded[name], ctx)
        except CTError:
            raise
        except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
            optimizer = wanted.get("optimizer")
            # Only a failure about the optimizer's state (a missing optimizer.state key, its
            # param_groups): a model that does not fit is not explained by these settings.
            if isinstance(optimizer, OptimizerState) and "optimizer" in str(e):
                optimizer.explain_load_failure(meta, path)
            raise
        if weights_only:
            optimizer = self.components.get("optimizer")
            if optimizer is not None:
                # bf16/fp16: the optimizer made its FP32 main copies from the initial weights;
                # without a refresh the first step would write those back over the loaded ones.
                optimizer.optimizer.reload_model_params()
            log.info(
                "loaded weights only from %s (iteration %d); optimizer and schedule start fresh", path, meta.iteration
            )
            return
        states = self._states(meta, loaded)
        for name, c in self._plain().items():
            if name in states:
                c.load_state_dict(states[name])
            else:
                log.info("checkpoint %s holds no %r state (format %d)", path, name, meta.format_version)

    @staticmethod
    def _states(meta: CheckpointMeta, loaded: dict[str, Any]) -> dict[str, Any]:
        """Every plain component's saved state, in this format's place or format 2's."""
        states = dict(meta.state or {})
        if meta.format_version <= 2:
            states.update({k: loaded[k] for k in _FORMAT_2_COMMON if k in loaded and k not in states})
        return states


def load_weights(load: str, chunks: list, key: str = "checkpoint.load") -> CheckpointMeta:
    """Collective: weights only into ``chunks`` (e.g. for inference or evaluation), from a save
    root or iter_* directory at any saved layout; returns the checkpoint's record."""
    from megatron_ct.checkpoint.meta import read_meta
    from megatron_ct.checkpoint.root import resolve_load_dir

    path, _ = resolve_load_dir(load, key)
    meta = read_meta(path)
    manager = CheckpointManager()
    manager.register("model", ModelState(chunks))
    manager.load(path, meta, weights_only=True)
    return meta
