"""RoPE with Hugging Face ``rope_scaling`` semantics, for megatron-core's ``GPTModel``.

Continual pre-training often changes the RoPE setup (a larger ``rope_theta``, or a scaling
type that stretches the context). The checkpoint must keep meaning the same thing in HF, so
the inverse frequencies here follow ``transformers.modeling_rope_utils`` (v5) formula for
formula, in FP32, for the rope types ``default``, ``linear``, ``dynamic``, ``yarn`` and
``llama3``.

Layout: megatron-core's non-interleaved rotary layout (``rotary_interleaved=False``,
``rotary_percent=1.0``) is HF's ``rotate_half`` layout: the angle table is
``cat(freqs, freqs)`` over the head dim and ``q * cos + rotate_half(q) * sin`` is applied.

YaRN's attention factor multiplies cos and sin in HF. megatron-core applies such a factor
through the ``mscale`` argument of ``apply_rotary_pos_emb``, which ``SelfAttention`` reads
from the model config (``yarn_*`` attributes); :func:`install_rope` sets those.

On CPU, where Transformer Engine's fused RoPE does not exist, :func:`install_cpu_rope_kernel`
puts :class:`_CpuRope` in megatron-core's fused-RoPE slot (``apply_rope_fusion``): the same
values and gradients as its unfused RoPE, with less work per layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)

from megatron_ct.config.rope import ROPE_TYPES, RopeScaling

__all__ = [
    "ROPE_TYPES",
    "RopeScaling",
    "HFRotaryEmbedding",
    "compute_inv_freq_and_attention_factor",
    "install_rope",
    "switch_rope",
]


def _default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    # [head_dim / 2] fp32: 1 / base^(2i / d), the exact expression HF evaluates.
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _yarn(head_dim: int, base: float, s: RopeScaling, max_pos: int) -> tuple[torch.Tensor, float]:
    original = s.original_max_position_embeddings or max_pos
    factor = s.factor if s.factor is not None else max_pos / original

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        # HF tests truthiness here, so mscale=0 falls back to the factor-only formula.
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # Head-dim index whose wavelength fits `rotations` times into the original context.
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp

    # [head_dim / 2]: 0 below `low` (extrapolate, keep the frequency), 1 above `high` (interpolate).
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def _llama3(inv_freq: torch.Tensor, s: RopeScaling, max_pos: int) -> torch.Tensor:
    original = s.original_max_position_embeddings or max_pos
    low_freq_wavelen = original / s.low_freq_factor
    high_freq_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between is blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq_and_attention_factor(
    head_dim: int,
    rotary_base: float,
    scaling: RopeScaling,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim // 2]`` (fp32, CPU) and the factor on cos/sin, as HF.

    ``seq_len`` only matters for ``dynamic`` (NTK-aware): the base grows once the sequence is
    longer than ``max_position_embeddings``; HF passes ``max(position_ids) + 1``.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    t = scaling.rope_type
    if t == "yarn":
        return _yarn(head_dim, rotary_base, scaling, max_position_embeddings)
    base = rotary_base
    if t == "dynamic" and seq_len is not None and seq_len > max_position_embeddings:
        # NTK-aware: grow the base with the length. HF evaluates this at run time with a
        # 0-dim tensor seq_len, i.e. in fp32; up to max_position_embeddings the base is unchanged.
        ratio = torch.tensor(seq_len, dtype=torch.float32) * scaling.factor / max_position_embeddings
        base = base * (ratio - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = _default_inv_freq(head_dim, base)
    if t == "linear":
        inv_freq = inv_freq / scaling.factor
    elif t == "llama3":
        inv_freq = _llama3(inv_freq, scaling, max_position_embeddings)
    return inv_freq, 1.0


def compute_cos_sin(
    head_dim: int,
    rotary_base: float,
    scaling: RopeScaling,
    max_position_embeddings: int,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-layout tables ``cos, sin: [seq_len, head_dim]`` fp32 for positions ``0..seq_len-1``.

    Equal to ``LlamaRotaryEmbedding(config)(x, position_ids)`` in fp32, attention factor included.
    """
    inv_freq, attention_factor = compute_inv_freq_and_attention_factor(
        head_dim, rotary_base, scaling, max_position_embeddings, seq_len
    )
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # [s, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [s, d]
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def _activation_device() -> torch.device:
    # GPTModel.forward passes only a length to the rotary module, so the device of the angle
    # table cannot come from an input; megatron-core's own module uses the current CUDA device.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class HFRotaryEmbedding(RotaryEmbedding):
    """Drop-in for megatron-core's ``RotaryEmbedding`` with HF ``rope_scaling`` frequencies.

    ``forward(max_seq_len, offset=0, ...)`` (inherited, LRU-cached) returns the angle table
    ``[s, 1, 1, head_dim]`` fp32; attention turns it into ``cos * mscale`` / ``sin * mscale``.
    The attention factor is not in this table: see :func:`install_rope`.

    ``dynamic``: the frequencies are recomputed for ``seq_len = offset + max_seq_len`` (the
    last position + 1, what HF uses) on each new length. HF instead keeps the frequencies of
    the longest sequence seen so far until a batch shorter than ``max_position_embeddings``
    resets them, so the two differ only after HF has seen a longer sequence in the same process.
    """

    def __init__(
        self,
        head_dim: int,
        rotary_base: float,
        scaling: RopeScaling,
        max_position_embeddings: int,
        cp_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        # The parent only stores the layout flags and the CP group here (CPU init avoids CUDA).
        super().__init__(
            kv_channels=head_dim,
            rotary_percent=1.0,
            rotary_interleaved=False,
            rotary_base=rotary_base,
            use_cpu_initialization=True,
            cp_group=cp_group,
        )
        self.head_dim = head_dim
        self.rotary_base = rotary_base
        self.scaling = scaling
        self.max_position_embeddings = max_position_embeddings
        # Plain attribute, not a buffer: Float16Module's .bfloat16() must not touch it.
        self.inv_freq, self.attention_factor = compute_inv_freq_and_attention_factor(
            head_dim, rotary_base, scaling, max_position_embeddings
        )

    def _inv_freq_for(self, seq_len: int) -> torch.Tensor:
        if self.scaling.rope_type == "dynamic" and seq_len > self.max_position_embeddings:
            inv_freq, _ = compute_inv_freq_and_attention_factor(
                self.head_dim, self.rotary_base, self.scaling, self.max_position_embeddings, seq_len
            )
            return inv_freq.to(self.inv_freq.device)
        return self.inv_freq

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """Angles ``[s, head_dim / 2]`` fp32 for positions ``offset .. offset + max_seq_len - 1``."""
        if self.inv_freq.device != _activation_device():
            self.inv_freq = self.inv_freq.to(_activation_device())
        inv_freq = self._inv_freq_for(offset + max_seq_len)
        positions = torch.arange(max_seq_len, device=inv_freq.device, dtype=torch.float32) + offset
        return torch.outer(positions, inv_freq)

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """Angle table ``[s, 1, 1, head_dim]`` in megatron's non-interleaved layout."""
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, d/2]
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    def get_cos_sin(self, max_seq_len: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin: [s, head_dim / 2]`` with the attention factor applied (flash-decode path,
        which does not apply ``mscale``)."""
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def _set_attention_factor(config: Any, attention_factor: float) -> None:
    """Make megatron-core's ``SelfAttention`` pass ``mscale=attention_factor`` to RoPE.

    ``SelfAttention`` computes ``mscale`` from ``config.yarn_rotary_scaling_factor``,
    ``yarn_mscale`` and ``yarn_mscale_all_dim`` as
    ``(0.1 * yarn_mscale * ln(f) + 1) / (0.1 * yarn_mscale_all_dim * ln(f) + 1)``.
    With ``f = e`` and ``yarn_mscale_all_dim = 0`` that is ``0.1 * yarn_mscale + 1``, so any
    factor (HF's explicit ``attention_factor`` included) is encoded exactly; the result is
    checked against megatron-core's own function so a change of its formula fails here.
    """
    if attention_factor == 1.0 and not hasattr(config, "yarn_rotary_scaling_factor"):
        return  # megatron-core already uses mscale=1 when the attributes are absent
    config.yarn_rotary_scaling_factor = math.e
    config.yarn_mscale = 10.0 * (attention_factor - 1.0)
    config.yarn_mscale_all_dim = 0.0
    got = _yarn_get_concentration_factor_from_config(config)
    if not math.isclose(got, attention_factor, rel_tol=1e-12):
        raise RuntimeError(f"megatron-core computes mscale={got}, expected attention_factor={attention_factor}")


def install_rope(
    gpt_model: torch.nn.Module,
    head_dim: int,
    rotary_base: float,
    scaling: RopeScaling,
    max_position_embeddings: int,
) -> HFRotaryEmbedding:
    """Replace a built ``GPTModel``'s rotary embedding with HF-equivalent frequencies.

    Call on each unwrapped model chunk (before DDP / Float16Module wrapping). Sets the
    ``yarn_*`` attributes of the shared ``TransformerConfig`` so attention multiplies cos and
    sin by the attention factor (YaRN), as HF does. Returns the new module.
    """
    from megatron.core.models.gpt import GPTModel

    if not isinstance(gpt_model, GPTModel):
        raise TypeError(f"install_rope needs an unwrapped megatron-core GPTModel, got {type(gpt_model).__name__}")
    config = gpt_model.config
    if gpt_model.position_embedding_type != "rope" or config.multi_latent_attention:
        raise ValueError(
            f"install_rope needs position_embedding_type='rope' without MLA, got {gpt_model.position_embedding_type!r}"
        )
    if config.rotary_interleaved:
        raise ValueError("rotary_interleaved=True does not match HF's rotate_half layout; set it to False")
    if gpt_model.rotary_percent != 1.0:
        raise ValueError(f"rotary_percent must be 1.0 (HF partial_rotary_factor=1), got {gpt_model.rotary_percent}")
    if config.kv_channels != head_dim:
        raise ValueError(f"head_dim={head_dim} differs from config.kv_channels={config.kv_channels}")

    rope = HFRotaryEmbedding(
        head_dim, rotary_base, scaling, max_position_embeddings, cp_group=gpt_model.rotary_pos_emb.cp_group
    )
    if rope.attention_factor != 1.0 and config.apply_rope_fusion:
        # Fused RoPE kernels (TE's, our CPU one) take no attention factor: megatron-core would use
        # its unfused RoPE at every call, warning each time. Ask for the unfused one.
        config.apply_rope_fusion = False
    gpt_model.rotary_pos_emb = rope
    gpt_model.rotary_pos_emb_cache = {}  # inference cos/sin cache built from the old module
    _set_attention_factor(config, rope.attention_factor)
    from megatron_ct.compat import refresh_yarn_attention_factor

    refresh_yarn_attention_factor(gpt_model, _yarn_get_concentration_factor_from_config(config))
    return rope


def switch_rope(
    chunks: list[torch.nn.Module],
    head_dim: int,
    rotary_base: float,
    rope_scaling: dict | None,
    max_position_embeddings: int,
) -> None:
    """Put this RoPE into a built model (its chunks, wrapped in DDP / Float16Module or not): a
    curriculum stage with another theta or scaling. The frequencies are recomputed as
    :func:`install_rope` computes them for a fresh model, YaRN's attention factor included (and
    reset to 1 when the new RoPE has none), so the model computes what one built with these
    values computes. RoPE has no parameters: weights and optimizer state are untouched."""
    from megatron.core.utils import unwrap_model

    scaling = RopeScaling.from_hf_dict(rope_scaling or {"rope_type": "default"})
    for chunk in chunks:
        install_rope(unwrap_model(chunk), head_dim, rotary_base, scaling, max_position_embeddings)


class _RopeFunction(torch.autograd.Function):
    """``t * cos + rotate_half(t) * sin`` on the two halves of the head dim, into one output.

    With ``t = [x1, x2]``: ``out = [x1 c1 - x2 s1, x2 c2 + x1 s2]``, and the backward is its
    transpose, ``dt = [g1 c1 + g2 s2, g2 c2 - g1 s1]``. Each product is rounded once and the two
    are added, as autograd does through megatron-core's unfused form (``a + (-b)`` is ``a - b``
    exactly), so values and gradients are bit-identical to it; the half-size operations write
    into one tensor instead of building ``rotate_half(t)`` and concatenating.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _RopeFunction._rotate(t, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _RopeFunction._rotate(grad, cos, sin, sign=-1.0), None, None

    @staticmethod
    def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
        # sign 1: the rotation (forward); sign -1: its transpose (backward).
        x1, x2 = torch.chunk(t, 2, dim=-1)
        c1, c2 = torch.chunk(cos, 2, dim=-1)
        s1, s2 = torch.chunk(sin, 2, dim=-1)
        out = torch.empty_like(t, memory_format=torch.contiguous_format)
        o1, o2 = torch.chunk(out, 2, dim=-1)
        torch.mul(x1, c1, out=o1)
        torch.mul(x2, c2, out=o2)
        if sign > 0:
            o1.sub_(x2 * s1)
            o2.add_(x1 * s2)
        else:
            o1.add_(x2 * s2)
            o2.sub_(x1 * s1)
        return out


class _CpuRope:
    """``fused_apply_rotary_pos_emb(t, freqs, interleaved)`` for CPU tensors.

    The same values and gradients, bit for bit, as megatron-core's unfused
    ``_apply_rotary_pos_emb_bshd`` with ``mscale=1`` (megatron-core calls a fused kernel for no
    other), minus its per-call work:

    - cos and sin of the angle table are computed once per table, not for every query and key
      of every layer: the rotary module returns the same (LRU-cached) table to all layers;
    - no ``rotate_half`` tensor, no concatenations (:class:`_RopeFunction`).
    """

    def __init__(self) -> None:
        self._freqs: torch.Tensor | None = None  # held, so its identity stays unique
        self._key: tuple = ()
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_: Any) -> torch.Tensor:
        if t.device.type != "cpu":
            raise RuntimeError(f"CPU RoPE kernel called on a {t.device.type} tensor")
        if interleaved or freqs.shape[-1] != t.shape[-1] or t.shape[-1] % 2:  # not LLaMA's: the general path
            return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
        return _RopeFunction.apply(t, *self._cos_sin_of(freqs, t.dtype))

    def _cos_sin_of(self, freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (freqs._version, dtype)
        if freqs is not self._freqs or key != self._key or self._cos_sin is None:
            with torch.no_grad():
                self._cos_sin = (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
            self._freqs, self._key = freqs, key
        return self._cos_sin


def install_cpu_rope_kernel() -> None:
    """Fill megatron-core's fused-RoPE slot with :class:`_CpuRope` where it is empty (no
    Transformer Engine; idempotent, a CUDA kernel is kept). It runs only for models whose
    config sets ``apply_rope_fusion``, which :func:`megatron_ct.model.llama.transformer_config`
    does on CPU only."""
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = _CpuRope()
