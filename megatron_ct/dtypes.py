"""The one map from our precision names (``train.precision``, ``--dtype``, ``--precision``) to torch."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str, key: str = "--dtype") -> torch.dtype:
    """``'bf16'`` -> ``torch.bfloat16``; an unknown name is a one-line error naming ``key``."""
    from megatron_ct.errors import ConfigError

    if name not in DTYPES:
        raise ConfigError(f"{key} {name}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]
