"""HF ``rope_scaling`` (``rope_parameters`` in transformers 5) as a typed, validated value.

Parsed where the config is built (``model.rope_scaling``), so a bad scaling type or key is a
config error naming the key, not a traceback when the model is built. The frequencies it
implies are computed in :mod:`megatron_ct.model.rope`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

# Keys each rope type accepts besides ``rope_type``; anything else is a config error
# (HF only warns, but an ignored key silently changes what the model computes).
_KEYS_BY_TYPE = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
# Keys HF keeps in the same dict that are not scaling parameters (HF 5 ``rope_parameters``).
_IGNORED_HF_KEYS = {"rope_theta"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """HF ``rope_scaling`` / ``rope_parameters`` entry; field names are the HF keys."""

    rope_type: str = "default"
    """One of ``default``, ``linear``, ``dynamic``, ``yarn``, ``llama3``."""
    factor: float | None = None
    """Context stretch factor. Required except for ``default``; YaRN derives it from
    ``max_position_embeddings / original_max_position_embeddings`` when None (as HF)."""
    original_max_position_embeddings: int | None = None
    """Pre-training context length (yarn, llama3). None means ``max_position_embeddings`` (as HF)."""
    attention_factor: float | None = None
    """YaRN: factor on cos and sin. None: derived from factor/mscale/mscale_all_dim (as HF)."""
    beta_fast: float | None = None
    """YaRN: rotations bounding the extrapolated band. None or 0 means 32 (as HF)."""
    beta_slow: float | None = None
    """YaRN: rotations bounding the interpolated band. None or 0 means 1 (as HF)."""
    mscale: float | None = None
    """YaRN: numerator scale of the derived attention factor (DeepSeek style)."""
    mscale_all_dim: float | None = None
    """YaRN: denominator scale of the derived attention factor (DeepSeek style)."""
    truncate: bool | None = None
    """YaRN: round the correction range to integers. None means True (as HF)."""
    low_freq_factor: float | None = None
    """llama3: wavelengths above ``original / low_freq_factor`` are divided by ``factor``."""
    high_freq_factor: float | None = None
    """llama3: wavelengths below ``original / high_freq_factor`` are kept."""

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not supported; use one of {ROPE_TYPES}")
        allowed = _KEYS_BY_TYPE[self.rope_type]
        for f in dataclasses.fields(self):
            if f.name != "rope_type" and getattr(self, f.name) is not None and f.name not in allowed:
                raise ValueError(f"rope_scaling.{f.name} is not used by rope_type={self.rope_type!r}; remove it")
        needs_factor = self.rope_type in ("linear", "dynamic", "llama3")
        if needs_factor and self.factor is None:
            raise ValueError(f"rope_scaling.factor is required for rope_type={self.rope_type!r}")
        if self.factor is not None and not self.factor >= 1.0:
            raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"rope_scaling.attention_factor must be > 0, got {self.attention_factor}")
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings < 1:
            raise ValueError(
                "rope_scaling.original_max_position_embeddings must be >= 1, "
                f"got {self.original_max_position_embeddings}"
            )
        if self.rope_type == "yarn" and (self.beta_fast or 32) < (self.beta_slow or 1):
            raise ValueError(f"rope_scaling.beta_fast ({self.beta_fast}) must be >= beta_slow ({self.beta_slow})")
        if self.rope_type == "llama3":
            if self.low_freq_factor is None or self.high_freq_factor is None:
                raise ValueError("rope_scaling.low_freq_factor and high_freq_factor are required for llama3")
            if not self.high_freq_factor > self.low_freq_factor:
                raise ValueError(
                    f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be > "
                    f"low_freq_factor ({self.low_freq_factor})"
                )

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any] | None) -> RopeScaling:
        """Parse HF ``rope_scaling`` (v4) or ``rope_parameters`` (v5); None means ``default``.

        Accepts the legacy key ``type`` for ``rope_type``. ``rope_theta`` is ignored (it is the
        ``rotary_base`` argument, not a scaling parameter); ``partial_rotary_factor`` must be 1.
        """
        if not d:
            return cls()
        d = dict(d)
        if "type" in d:
            legacy = d.pop("type")
            if d.setdefault("rope_type", legacy) != legacy:
                raise ValueError(f"rope_scaling.type={legacy!r} contradicts rope_type={d['rope_type']!r}")
        prf = d.pop("partial_rotary_factor", None)
        if prf not in (None, 1, 1.0):
            raise ValueError(f"rope_scaling.partial_rotary_factor={prf} is not supported (must be 1.0)")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names and key not in _IGNORED_HF_KEYS:
                raise ValueError(f"rope_scaling.{key} is not a known RoPE scaling key")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_dict(self) -> dict[str, Any]:
        """HF ``rope_scaling`` dict: ``rope_type`` plus the fields that are set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
