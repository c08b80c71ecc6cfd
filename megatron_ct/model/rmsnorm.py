"""RMSNorm for megatron-core layer specs: a fused kernel when one is installed, else ours.

Order of preference, decided at run time (a missing package never fails an import):
1. Transformer Engine (megatron-core's ``TENorm``), when TE imports and CUDA is available;
2. apex ``FusedRMSNorm``, when apex and its ``fused_layer_norm_cuda`` extension are present
   and CUDA is available;
3. :class:`CompiledRMSNorm`, the same formula as 4 fused by ``torch.compile`` (one Triton
   kernel forward, one backward), when CUDA and Triton are available: the fused norm of a
   plain PyTorch install;
4. :class:`FP32StatsRMSNorm`, plain PyTorch.

All of them compute the statistics in FP32 for bf16/fp16 inputs and return the input dtype,
and all mark the weight with ``sequence_parallel`` so megatron-core all-reduces its gradient
across TP ranks under sequence parallelism (each rank only sees its slice of the sequence).
megatron-core's own PyTorch fallback, ``WrappedTorchNorm`` (``torch.nn.RMSNorm``), refuses
``sequence_parallel=True`` for exactly that reason: it does not set the attribute, so
``finalize_model_grads`` would leave each rank with a partial weight gradient.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

logger = logging.getLogger(__name__)

# What importing an installed-but-broken GPU extension raises (missing .so, CUDA mismatch, ...).
_BROKEN_IMPORT = (ImportError, OSError, RuntimeError, AttributeError, ValueError)

TRANSFORMER_ENGINE = "transformer_engine"
APEX = "apex"
TORCH_COMPILE = "torch_compile"
TORCH_FP32_STATS = "torch_fp32_stats"


class FP32StatsRMSNorm(torch.nn.Module):
    """RMSNorm computed as HF's ``LlamaRMSNorm`` (transformers 5).

    ``y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`` with ``x32 = x.float()``:
    mean of squares and rsqrt in FP32, the normalised value rounded once to the input
    dtype, then the weight applied. With the weight in the input dtype (megatron's
    Float16Module) this is bitwise HF; otherwise the product is rounded to the input dtype
    (HF would return the promoted dtype).

    The normalisation is ``torch.nn.functional.rms_norm`` without a weight, which upcasts
    bf16/fp16 to FP32 internally: on CPU it decomposes into exactly these ops, on CUDA torch
    can run it as its fused RMSNorm kernel (not measured here: no GPU in this session). The
    weight is applied afterwards because HF multiplies after rounding.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"normalization={config.normalization!r}: FP32StatsRMSNorm needs 'RMSNorm'")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by HF-style RMSNorm; set it False")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Read by megatron-core's finalize_model_grads: sum this grad over the TP group.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [s, b, h]`` (any leading dims) -> same shape and dtype."""
        return hf_rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm on ``x [..., h]``: FP32 statistics, normalised value rounded to x.dtype, then the weight."""
    normed = F.rms_norm(x, (x.shape[-1],), eps=eps)  # fp32 inside, x.dtype out
    return (weight * normed).to(x.dtype)


@functools.cache
def compiled_rms_norm():
    """:func:`hf_rms_norm` through ``torch.compile``, or None where that cannot keep its numerics.

    Inductor may otherwise skip the explicit round trip through the input dtype between the
    normalisation and the weight product; ``emulate_precision_casts`` keeps it, so the forward
    is bitwise the eager one (the backward's reductions may differ by a rounding).
    """
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "emulate_precision_casts"):
        return None
    return torch.compile(hf_rms_norm, dynamic=False, options={"emulate_precision_casts": True})


class CompiledRMSNorm(FP32StatsRMSNorm):
    """:class:`FP32StatsRMSNorm` fused by ``torch.compile`` (same parameters, same numbers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return compiled_rms_norm()(x, self.weight, self.eps)


def _build_te(config: TransformerConfig, hidden_size: int, eps: float) -> torch.nn.Module:
    from megatron.core.extensions.transformer_engine import TENorm

    # TE takes sequence_parallel and marks the weight itself.
    return TENorm(config=config, hidden_size=hidden_size, eps=eps)


def _build_apex(config: TransformerConfig, hidden_size: int, eps: float) -> torch.nn.Module:
    from apex.normalization import FusedRMSNorm

    if config.layernorm_zero_centered_gamma:
        raise ValueError("layernorm_zero_centered_gamma is not supported by apex FusedRMSNorm; set it False")
    norm = FusedRMSNorm(hidden_size, eps=eps)
    norm.weight.sequence_parallel = config.sequence_parallel
    return norm


_BUILDERS = {
    TRANSFORMER_ENGINE: _build_te,
    APEX: _build_apex,
    TORCH_COMPILE: CompiledRMSNorm,
    TORCH_FP32_STATS: FP32StatsRMSNorm,
}


def _importable(name: str) -> bool:
    try:  # find_spec imports the parent packages
        return importlib.util.find_spec(name) is not None
    except _BROKEN_IMPORT as e:
        logger.info("rmsnorm: %s is not usable: %s", name, e)
        return False


@functools.cache
def available_norm_impls() -> tuple[str, ...]:
    """Implementations usable in this process, best first; always ends with the fallback."""
    found = []
    if torch.cuda.is_available():
        try:
            from megatron.core.extensions.transformer_engine import HAVE_TE

            if HAVE_TE:
                found.append(TRANSFORMER_ENGINE)
        except _BROKEN_IMPORT as e:  # a broken TE install must not take the trainer down
            logger.info("rmsnorm: Transformer Engine is not usable: %s", e)
        if _importable("apex.normalization") and _importable("fused_layer_norm_cuda"):
            found.append(APEX)
        from megatron_ct.model.fusion import gpu_compile_usable

        if gpu_compile_usable()[0] and compiled_rms_norm() is not None:
            found.append(TORCH_COMPILE)
    found.append(TORCH_FP32_STATS)
    return tuple(found)


def norm_impl() -> str:
    """The implementation :class:`RMSNorm` builds: the first of :func:`available_norm_impls`."""
    return available_norm_impls()[0]


def build_rmsnorm(
    config: TransformerConfig, hidden_size: int, eps: float = 1e-5, impl: str | None = None
) -> torch.nn.Module:
    """Build an RMSNorm with ``impl`` (one of the ``*`` constants here), default :func:`norm_impl`."""
    impl = impl or norm_impl()
    if config.normalization != "RMSNorm":
        raise ValueError(f"normalization={config.normalization!r}: set it to 'RMSNorm' to build an RMSNorm")
    if impl not in _BUILDERS:
        raise ValueError(f"rmsnorm impl={impl!r} is unknown; use one of {sorted(_BUILDERS)}")
    return _BUILDERS[impl](config, hidden_size, eps)


class RMSNorm:
    """Layer-spec entry (``layernorm=RMSNorm``): builds the best available RMSNorm.

    Same constructor as megatron-core's norms, ``(config, hidden_size, eps)``; like
    megatron-core's ``TENorm`` it returns an instance of the chosen class.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> torch.nn.Module:
        return build_rmsnorm(config, hidden_size, eps)


def describe_norm_impl() -> str:
    """One line for the start-up log: which RMSNorm is used and what else was found."""
    names = {
        TRANSFORMER_ENGINE: "Transformer Engine RMSNorm (fused)",
        APEX: "apex FusedRMSNorm (fused)",
        TORCH_COMPILE: "megatron_ct CompiledRMSNorm (torch.compile, FP32 statistics)",
        TORCH_FP32_STATS: "megatron_ct FP32StatsRMSNorm (PyTorch, FP32 statistics)",
    }
    found = available_norm_impls()
    return f"RMSNorm: {names[found[0]]}; available: {', '.join(found)}"
