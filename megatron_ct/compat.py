"""megatron-core versions: which ones megatron-ct is tested with, and the shims between them.

The pin for CPU (Python 3.11, tests) is megatron-core 0.16.1. GPU images ship Python 3.12, for
which pip installs the newest megatron-core (>= 0.17 needs Python >= 3.12); setup.py allows up
to the newest version checked here. Everything version-dependent that megatron-ct needs lives in
this module, so a new megatron-core release is one place to look at.

What differs between the tested versions, and how megatron-ct meets it:

- ``GPTModel._postprocess`` gained keyword arguments (``padding_mask``, ``output_processor``,
  ``output_processor_context`` in 0.19) and MuP logit scaling: the chunked loss
  (megatron_ct/model/chunked_loss.py) binds the call by name and hands every case it does not
  handle (an ``output_processor``, ``use_mup``, MTP, inference) back to megatron-core.
- 0.19's ``SelfAttention`` caches the YaRN attention factor (``_yarn_concentration_factor``) when
  it is built; 0.16.1 reads it from the config on every call. megatron_ct/model/rope.py sets the
  factor on the config after the model is built, so :func:`refresh_yarn_attention_factor` updates
  the cached copies too.
- 0.19's ``dist_checkpointing.core.CheckpointingConfig`` dropped the ``common_backend`` fields
  (0.16.1 defaults them to 'torch', 1; 0.19 ignores them when reading): checkpoints written by
  either load with both. :func:`checkpointing_config` builds it by keyword for both.
- 0.19 imports ``triton`` when megatron-core is imported (its MoE paged stash): present with
  every CUDA build of torch; a CPU-only Python 3.12 install would need it too.
- 0.19 logs "GPTModel IS DEPRECATED" (HybridModel is its successor); GPTModel still works.
- 0.16.1's distributed optimizer on the torch.optim.Adam path (every CPU run: no apex / TE)
  cannot load what it saved: :func:`prepare_torch_adam_for_load` and
  :func:`unshare_torch_adam_steps` (used by the checkpoint manager) work around it; they change
  nothing where the loader already works, and nothing at all when apex or TE provide the Adam.

- 0.16.1's MoE router (``moe_utils.RouterGatingLinearFunction``) reads ``te_general_gemm``,
  which ``moe_utils`` defines only when Transformer Engine imports: without TE (every CPU run, any
  GPU image without it) the router raises NameError. :func:`define_moe_router_gemm` defines it as
  None, megatron-core's own "no TE GEMM" value (the torch.mm path); nothing changes where TE is
  importable.

- megatron-core decorates its fusion functions with ``jit_fuser``, which is ``torch.compile``
  at import: importing megatron-core imports torch's compiler stack (dynamo, inductor), about
  1.2 s of every process start on 2 CPU cores. The fused kernels are never used on CPU (the
  model config turns the fusions off there). :func:`install_eager_fusions_on_cpu` (called when
  megatron_ct is imported) makes ``torch.compile`` an identity while megatron-core imports, on
  machines without CUDA only: ``jit_fuser`` is then megatron-core's own no-op, as after its
  ``disable_jit_fuser()``, and ``torch.compile`` is the real one again for everything else.

- 0.16.1's ``parallel_state.destroy_model_parallel`` leaves
  ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP`` (and its gloo copy) set, which keeps that process
  group (and its worker threads) alive until interpreter exit: :func:`forget_leftover_groups` (called by the
  teardown, megatron_ct/parallel/distributed.py) resets it.

Everything else megatron-ct calls (parallel_state, the layer specs, DotProductAttention, the
schedules, DDP, the distributed optimizer, dist_checkpointing, the indexed dataset) has the
same interface in 0.16.1 and 0.19.2.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)

# version -> how it was tested
TESTED_VERSIONS = {
    "0.16.1": "the pin: the whole test suite on CPU (Python 3.11)",
    "0.19.2": (
        "newest release for Python 3.12 (GPU images): the model, parallel-parity, resume/reshard and "
        "training-loop tests run on CPU against its wheel; bench/gpu_check.sh installs it on GPU"
    ),
}


def megatron_core_version() -> str:
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def _as_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def version_note(version: str) -> str | None:
    """None for a tested version, else the one-line warning for the start-up log."""
    if version in TESTED_VERSIONS:
        return None
    tested = ", ".join(TESTED_VERSIONS)
    newest = max(TESTED_VERSIONS, key=_as_tuple)
    if version != "unknown" and _as_tuple(version) > _as_tuple(newest):
        hint = f"newer than the newest tested ({newest}); if something fails, install megatron-core=={newest}"
    else:
        hint = "install megatron-core==0.16.1 (Python 3.11) or the newest tested release (Python 3.12)"
    return f"megatron-core {version} is untested with megatron-ct (tested: {tested}): {hint}"


@functools.cache
def check_megatron_core_version() -> str:
    """Log (once per process) whether the installed megatron-core is one megatron-ct is tested with."""
    version = megatron_core_version()
    note = version_note(version)
    if note:
        log.warning(note)
    else:
        log.info("megatron-core %s: tested, %s", version, TESTED_VERSIONS[version])
    return version


def refresh_yarn_attention_factor(model, attention_factor: float) -> int:
    """megatron-core >= 0.19: set the YaRN factor its attention modules cached at construction.

    Returns how many modules held a cached copy (0 on 0.16.1, which reads the config per call).
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "_yarn_concentration_factor"):
            module._yarn_concentration_factor = attention_factor
            count += 1
    return count


def checkpointing_config(sharded_backend: str = "torch_dist", version: int = 1):
    """``CheckpointingConfig`` (the checkpoint's metadata.json) for any tested megatron-core."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    return CheckpointingConfig(sharded_backend=sharded_backend, sharded_backend_version=version)


# --- the distributed optimizer on the torch.optim.Adam path (no apex / Transformer Engine) --------


def prepare_torch_adam_for_load(optimizer) -> None:
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
    import torch
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


def unshare_torch_adam_steps(optimizer) -> None:
    """megatron-core's distributed optimizer restores torch Adam's 'step' as one tensor
    object shared by every parameter's state; torch increments it in place once per
    parameter, which corrupts Adam's bias correction after a resume. Give each its own."""
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def forget_leftover_groups() -> None:
    """After ``destroy_model_parallel``: the process groups megatron-core still refers to, let go."""
    from megatron.core import parallel_state

    for name in ("_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP", "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO"):
        if getattr(parallel_state, name, None) is not None:
            setattr(parallel_state, name, None)


def define_moe_router_gemm() -> None:
    """``moe_utils.te_general_gemm = None`` where megatron-core left it undefined (no Transformer
    Engine): its router then takes the torch.mm path it has for exactly that case."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _identity_compile(model=None, **_kwargs):
    """``torch.compile`` as megatron-core's decorators use it, compiling nothing."""
    return model if model is not None else (lambda fn: fn)


class _EagerFusionsLoader:
    """Runs megatron-core's package import with ``torch.compile`` replaced (no CUDA only)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        import torch

        module.__loader__ = module.__spec__.loader = self.loader  # leave no trace once imported
        if torch.cuda.is_available():
            self.loader.exec_module(module)
            return
        real = torch.compile
        torch.compile = _identity_compile
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = real


class _EagerFusionsFinder(importlib.abc.MetaPathFinder):
    """Hands ``megatron.core``'s spec (found by the other finders) the loader above, once."""

    def find_spec(self, name, path=None, target=None):
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _EagerFusionsLoader(spec.loader)
        return spec


def install_eager_fusions_on_cpu() -> None:
    """Before megatron-core is imported: import it without torch's compiler where there is no
    CUDA (see the module notes). Nothing happens once it is imported, or twice."""
    if "megatron.core" in sys.modules or any(isinstance(f, _EagerFusionsFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _EagerFusionsFinder())
