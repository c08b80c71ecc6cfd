"""Model families: one declarative spec per family (:mod:`megatron_ct.families.spec`).

Every module of this package that defines ``FAMILY`` is a family; adding one is one new file
(plus its tests). ``model.family`` names it, or it is detected: from an HF ``config.json``'s
``architectures`` (the converter), or, for configs written before families existed, from
``model.add_qkv_bias`` / ``model.qk_layernorm``.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from megatron_ct.errors import ConfigError
from megatron_ct.families.spec import ModelFamily

if TYPE_CHECKING:
    from megatron_ct.config import ModelConfig

__all__ = ["ModelFamily", "all_families", "get_family", "family_of", "family_for_hf", "detect_family"]


@functools.cache
def all_families() -> dict[str, ModelFamily]:
    """name -> family, for every module here that defines ``FAMILY``."""
    out: dict[str, ModelFamily] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, ModelFamily):
            out[family.name] = family
    return out


def get_family(name: str, key: str = "model.family") -> ModelFamily:
    families = all_families()
    if name not in families:
        raise ConfigError(f"{key}: expected one of {', '.join(families)}, got {name!r}")
    return families[name]


def family_of(m: ModelConfig) -> ModelFamily:
    """The family of a (validated) model config."""
    return get_family(m.family)


def detect_family(qkv_bias: bool, qk_norm: bool) -> ModelFamily:
    """The dense family with these layer features (configs and checkpoints from before
    ``model.family``; the MoE families came later and are always named)."""
    for family in all_families().values():
        if not family.moe and (family.qkv_bias, family.qk_norm) == (qkv_bias, qk_norm):
            return family
    raise ConfigError(
        f"model.add_qkv_bias={qkv_bias}, model.qk_layernorm={qk_norm}: expected the features of one model family "
        f"({', '.join(all_families())}); set model.family"
    )


def family_for_hf(hf: dict[str, Any], source: str) -> tuple[ModelFamily, str]:
    """(family, architecture) of an HF ``config.json`` dict, by its ``architectures``."""
    from megatron_ct.errors import ConversionError

    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    for family in all_families().values():
        if arch in family.architecture_names:
            return family, arch
    supported = ", ".join(a for f in all_families().values() for a in f.architecture_names)
    raise ConversionError(f"{source}: architectures={archs!r} is not supported; expected one of {supported}")
