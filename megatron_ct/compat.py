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

Everything else megatron-ct calls (parallel_state, the layer specs, DotProductAttention, the
schedules, DDP, the distributed optimizer, dist_checkpointing, the indexed dataset) has the
same interface in 0.16.1 and 0.19.2.
"""

from __future__ import annotations

import functools
import logging

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
