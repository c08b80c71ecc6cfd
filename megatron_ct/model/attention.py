"""Core attention for megatron-core layer specs: PyTorch SDPA, FlexAttention, or megatron-core's own.

``model.attention_backend`` picks the module that sits in the layer spec's ``core_attention``
slot (where megatron-core puts ``DotProductAttention`` or TE's ``TEDotProductAttention``):

- ``local``: megatron-core's ``DotProductAttention`` (:class:`LocalAttention` adds segment-id
  masks to it). Materialises the ``[b, heads, s, s]`` scores; the reference the others are
  tested against, and the only choice that honours ``attention_softmax_in_fp32=False``.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN / memory-
  efficient kernels on GPU). Plain causal attention runs ``is_causal=True``; a document mask
  becomes a dense boolean ``attn_mask`` (correct, but the flash kernel cannot take it).
- ``flex``: FlexAttention with a block mask built from the documents' segment ids: causal and
  block-diagonal, whole ``128 x 128`` tiles of other documents skipped, no ``[s, s]`` mask in
  the kernel. Compiled with ``torch.compile`` on GPU; eager (unfused, for tests) on CPU.
- ``te``: Transformer Engine's ``TEDotProductAttention`` (with the TE layer spec).

Masks. A batch may carry, under the ``attention_mask`` key that megatron-core passes through
to ``core_attention`` untouched:

- nothing (None): plain causal attention;
- ``[b, 1, s, s]`` bool, True = masked (what megatron_ct/data/packing.py builds today);
- ``[b, s]`` integer segment ids, one per token: the document each token belongs to within
  its sequence (padding is a segment of its own). A token attends to earlier tokens of its
  own segment. This is what the data path should send: ``s`` integers instead of ``s * s``
  booleans, and FlexAttention builds its block mask from them on the device.

Softmax precision. ``sdpa`` and ``flex`` keep the scores and the softmax statistics in FP32
inside the kernel whatever the input dtype (online softmax), so ``attention_softmax_in_fp32``
holds by construction; ``local`` computes the scores in the input dtype (bf16 rounding before
the softmax, see tests/model/test_softmax_fp32.py) and the softmax in FP32 when asked.
:func:`describe_attention` says which for the start-up log.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_ct.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "te", "sdpa", "flex", "local")


# --------------------------------------------------------------------------- choosing


def have_flex_attention() -> bool:
    """FlexAttention ships with torch >= 2.5."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def choose_attention_backend(
    requested: str, transformer_impl: str, device: torch.device, document_masks: bool, cp: int = 1
) -> str:
    """Resolve ``model.attention_backend`` for this run (:func:`_choose`), checked against
    context parallelism ``cp``: megatron-core's ``local`` attention has none."""
    backend = _choose(requested, transformer_impl, device, document_masks)
    if cp > 1 and backend == "local":
        raise ConfigError(
            f"model.attention_backend: expected sdpa, flex or te under context parallelism (context_parallel_size="
            f"{cp}), got local"
        )
    return backend


def _choose(requested: str, transformer_impl: str, device: torch.device, document_masks: bool) -> str:
    """Resolve ``model.attention_backend`` for this run.

    ``transformer_impl`` is the resolved layer implementation ('transformer_engine' or
    'local'); ``document_masks`` says whether some batch carries a document mask. ``auto``:
    on GPU, TE's attention when the TE layer spec is used and no batch needs a document mask
    (TE's causal attention ignores explicit masks), else ``flex`` for document masks and
    ``sdpa`` for plain causal attention; on CPU ``sdpa`` (with the dense document mask where
    there is one: the same mask ``local`` builds, and 1.16x faster steps in bench_train.py).
    """
    if requested not in BACKENDS:
        raise ConfigError(f"model.attention_backend: expected one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "auto":
        if device.type != "cuda":
            return "sdpa"
        if document_masks:
            # FlexAttention is only fast compiled; without Triton/a C compiler SDPA takes the mask.
            return "flex" if have_flex_attention() and _flex_compilable() else "sdpa"
        return "te" if transformer_impl == "transformer_engine" else "sdpa"
    if requested == "te" and transformer_impl != "transformer_engine":
        raise ConfigError(
            "model.attention_backend: 'te' needs the Transformer Engine layer spec (model.transformer_impl="
            f"transformer_engine, or auto with TE on GPU), got transformer_impl={transformer_impl}"
        )
    if requested == "flex" and not have_flex_attention():
        raise ConfigError(
            f"model.attention_backend: 'flex' needs torch >= 2.5 (torch.nn.attention.flex_attention); "
            f"torch {torch.__version__} has none; use sdpa or local"
        )
    return requested


def _flex_compilable() -> bool:
    from megatron_ct.model.fusion import gpu_compile_usable

    return gpu_compile_usable()[0]


def describe_attention(backend: str, softmax_in_fp32: bool) -> str:
    """One line for the start-up log: the attention kernel and where its softmax is computed."""
    if backend == "local":
        return (
            "attention: megatron-core DotProductAttention (local, [b, heads, s, s] scores in the input dtype; "
            f"softmax in {'FP32' if softmax_in_fp32 else 'the input dtype'})"
        )
    what = {
        "sdpa": "torch scaled_dot_product_attention",
        "flex": "torch FlexAttention (block mask from segment ids)",
        "te": "Transformer Engine DotProductAttention",
    }[backend]
    line = f"attention: {what}; scores and softmax statistics in FP32 inside the fused kernel"
    if not softmax_in_fp32:
        line += " (model.attention_softmax_in_fp32=false has no effect on this backend)"
    if backend == "flex" and torch.cuda.is_available() and not _flex_compilable():
        from megatron_ct.model.fusion import gpu_compile_usable

        line += f"; WARNING: not compiled ({gpu_compile_usable()[1]}): eager FlexAttention materialises the scores"
    if backend == "sdpa" and torch.cuda.is_available():
        allowed = getattr(torch.backends.cuda, "fp16_bf16_reduction_math_sdp_allowed", lambda: False)()
        if allowed:
            line += "; WARNING: the math fallback may reduce in bf16/fp16 (allow_fp16_bf16_reduction_math_sdp)"
    return line


# --------------------------------------------------------------------------- masks


def is_segment_ids(mask: torch.Tensor | None) -> bool:
    """``[b, s]`` integer segment ids (as opposed to a ``[b, 1, s, s]`` boolean mask)."""
    return mask is not None and mask.dim() == 2 and not mask.dtype.is_floating_point and mask.dtype != torch.bool


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` segment ids -> ``[b, 1, s, s]`` bool, True = masked (causal and block-diagonal)."""
    s = segment_ids.shape[-1]
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=segment_ids.device), diagonal=1)  # key after query
    other_doc = segment_ids[:, :, None] != segment_ids[:, None, :]  # [b, s, s]
    return (causal[None] | other_doc).unsqueeze(1)


def dense_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Either mask format -> ``[b, 1, s, s]`` bool, True = masked (None stays None)."""
    if attention_mask is None or not is_segment_ids(attention_mask):
        return attention_mask
    return document_mask(attention_mask)


class BlockMaskCache:
    """FlexAttention block masks of the current micro-batches, shared by all layers of a model.

    Every layer sees the same mask tensor in one forward pass; building the block mask once
    per micro-batch instead of once per layer saves ``num_layers - 1`` mask evaluations. Keys
    hold a reference to the mask tensor, so its storage cannot be freed and reused by another
    batch's mask while the entry lives (an address match is then the same data; a recompute
    under activation checkpointing passes a detached alias of the same storage).
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()

    @staticmethod
    def _key(mask: torch.Tensor | None, b: int, s_q: int, s_k: int, device: torch.device) -> tuple:
        if mask is None:  # plain causal: one block mask per shape, broadcast over the batch
            return ("causal", s_q, s_k, str(device))
        return ("mask", mask.data_ptr(), tuple(mask.shape), tuple(mask.stride()), mask.dtype, mask._version, b)

    def get(self, mask: torch.Tensor | None, b: int, s_q: int, s_k: int, device: torch.device):
        key = self._key(mask, b, s_q, s_k, device)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[1]
        block_mask = _build_block_mask(mask, b, s_q, s_k, device)
        self._entries[key] = (mask, block_mask)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return block_mask


def _build_block_mask(mask: torch.Tensor | None, b: int, s_q: int, s_k: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    if s_q != s_k:
        raise ValueError(f"flex attention: query length {s_q} != key length {s_k} (no KV cache support)")
    if mask is None:

        def mask_mod(b_, h_, q_idx, kv_idx):
            return q_idx >= kv_idx

        batch = None
    elif is_segment_ids(mask):
        # A new closure per micro-batch: the compiled flex_attention lifts the captured tensor as
        # an input instead of recompiling (checked on torch 2.13: one graph for any number of masks).
        seg = mask  # [b, s]

        def mask_mod(b_, h_, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (seg[b_, q_idx] == seg[b_, kv_idx])

        batch = b
    else:
        allowed = ~mask[:, 0]  # [b, s, s], True = attend

        def mask_mod(b_, h_, q_idx, kv_idx):
            return allowed[b_, q_idx, kv_idx]

        batch = b
    kwargs = {}
    if device.type == "cuda" and _flex_compilable():
        # Builds the block mask without materialising [b, s, s] (torch >= 2.5).
        kwargs["_compile"] = True
    return create_block_mask(mask_mod, batch, None, s_q, s_k, device=device, **kwargs)


# --------------------------------------------------------------------------- modules


class LocalAttention(DotProductAttention):
    """megatron-core's ``DotProductAttention``, also taking ``[b, s]`` segment ids as the mask."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, **kwargs):
        return super().forward(query, key, value, dense_mask(attention_mask), attn_mask_type, attention_bias, **kwargs)


class _TorchCoreAttention(MegatronModule):
    """Shared part of the SDPA and Flex modules: megatron-core's core-attention interface.

    Inputs ``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` (this TP rank's heads;
    ``ng`` query groups for GQA), output ``[sq, b, np * hn]``, as ``DotProductAttention``.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **_unused,
    ) -> None:
        super().__init__(config=config)
        name = type(self).__name__
        # Context parallelism: this rank holds two chunks of each sequence; attention gathers
        # the keys and values of the CP group (megatron_ct/parallel/context.py).
        self.cp_group = None
        if config.context_parallel_size > 1:
            from megatron.core import parallel_state as ps

            self.cp_group = getattr(pg_collection, "cp", None) or ps.get_context_parallel_group()
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"{name}: softmax_type={config.softmax_type!r} is not supported (use 'vanilla')")
        if getattr(config, "window_size", None) is not None:
            raise ValueError(f"{name}: sliding-window attention is not supported (window_size=None)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"{name}: only causal self-attention is supported, got {attn_mask_type}")
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= max(1, layer_number)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
        **_unused,
    ) -> torch.Tensor:
        name = type(self).__name__
        if packed_seq_params is not None:
            raise ValueError(f"{name}: packed_seq_params (THD layout) is not supported; pass segment ids as the mask")
        if attention_bias is not None:
            raise ValueError(f"{name}: attention_bias is not supported")
        sq, b, heads, hn = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        if q.device.type == "cpu":
            # The CPU kernels read [b, heads, s, hn] views of the [s, b, ...] projections slower
            # than packed copies (about 0.5 ms per micro-batch at the benchmark's CPU shape).
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if self.cp_group is not None:
            from megatron_ct.parallel.context import context_parallel_attention

            if attention_mask is not None and not is_segment_ids(attention_mask):
                raise ValueError(f"{name}: under context parallelism documents must come as segment ids [b, s]")
            dropout = self.dropout_p if self.training else 0.0
            out = context_parallel_attention(
                q, k, v, attention_mask, self.cp_group, self.softmax_scale, dropout, self._attend_allowed
            )
        else:
            out = self._attend(q, k, v, attention_mask)  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)  # [sq, b, hp]

    def _attend(self, q, k, v, attention_mask):  # pragma: no cover - abstract
        raise NotImplementedError

    def _attend_allowed(self, q, k, v, allowed):
        """SDPA with a boolean mask (True = attend): the kernel of every backend under CP,
        whose query chunks see a prefix of the gathered keys (FlexAttention would need a
        block mask per chunk and micro-batch; SDPA takes the dense one)."""
        return _sdpa(q, k, v, allowed, self.softmax_scale, self.dropout_p if self.training else 0.0)


@functools.cache
def _sdpa_takes_enable_gqa() -> bool:
    """``enable_gqa`` arrived in torch 2.5; before it, keys and values are expanded by hand."""
    q = torch.zeros(1, 2, 1, 1)
    kv = torch.zeros(1, 1, 1, 1)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except TypeError:
        return False
    return True


def _expand_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    rep = heads // k.shape[1]
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _sdpa(q, k, v, allowed: torch.Tensor | None, scale: float, dropout: float) -> torch.Tensor:
    """SDPA with GQA; ``allowed`` a boolean mask (True = attend) or None for plain causal."""
    kwargs: dict[str, Any] = {"scale": scale}
    if allowed is None:
        kwargs["is_causal"] = True
    else:
        kwargs["attn_mask"] = allowed
    if q.shape[1] != k.shape[1]:  # GQA
        if _sdpa_takes_enable_gqa():
            kwargs["enable_gqa"] = True
        else:
            k, v = _expand_kv(k, v, q.shape[1])
    if dropout > 0.0:
        from megatron.core import tensor_parallel

        # The same RNG stream megatron-core's DotProductAttention draws its dropout from.
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


class SDPAttention(_TorchCoreAttention):
    """``core_attention`` on ``torch.nn.functional.scaled_dot_product_attention``."""

    def _attend(self, q, k, v, attention_mask):
        sq, sk = q.shape[2], k.shape[2]
        if attention_mask is None and sq != sk:
            raise ValueError(f"SDPAttention: query length {sq} != key length {sk} without a mask (no KV cache)")
        # SDPA's boolean mask is True = attend; ours is True = masked. [b, 1, sq, sk]
        allowed = None if attention_mask is None else ~dense_mask(attention_mask)
        return _sdpa(q, k, v, allowed, self.softmax_scale, self.dropout_p if self.training else 0.0)


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


@functools.cache
def _compiled_flex_attention():
    """FlexAttention is only fused when compiled; one compiled function per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class FlexCoreAttention(_TorchCoreAttention):
    """``core_attention`` on FlexAttention, with block masks from segment ids (or a dense mask).

    ``mask_cache`` is shared by the layers of one model (see :class:`BlockMaskCache`).
    """

    def __init__(self, config, layer_number, attn_mask_type, *args, mask_cache: BlockMaskCache | None = None, **kw):
        super().__init__(config, layer_number, attn_mask_type, *args, **kw)
        if self.dropout_p > 0.0:
            raise ValueError("FlexCoreAttention: attention dropout is not supported (attention_dropout=0)")
        self.mask_cache = mask_cache if mask_cache is not None else BlockMaskCache()

    def _attend(self, q, k, v, attention_mask):
        from torch.nn.attention.flex_attention import flex_attention

        if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            # torch's FlexAttention has no backward on CPU: train with the same mask through SDPA.
            _log_once("flex attention: no backward on CPU; training steps use SDPA with the dense mask there")
            return SDPAttention._attend(self, q, k, v, attention_mask)
        block_mask = self.mask_cache.get(attention_mask, q.shape[0], q.shape[2], k.shape[2], q.device)
        fn = _compiled_flex_attention() if q.is_cuda and _flex_compilable() else flex_attention
        return fn(q, k, v, block_mask=block_mask, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])


def core_attention_module(backend: str, mask_cache: BlockMaskCache | None = None):
    """What goes in the layer spec's ``core_attention`` slot for a resolved backend."""
    if backend == "local":
        return LocalAttention
    if backend == "sdpa":
        return SDPAttention
    if backend == "flex":
        return functools.partial(FlexCoreAttention, mask_cache=mask_cache or BlockMaskCache())
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    raise ValueError(f"unknown attention backend {backend!r}")
