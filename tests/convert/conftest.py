"""Session fixtures: the tiny HF models, converted once, with HF's own logits."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from convert_helpers import CASES, build_hf_model, build_tokenizer

from megatron_ct.convert.hf_to_ct import convert_hf_to_ct

TARGET_TP = 2  # converted for TP2 (vocab 300 -> 512 rows); loaded at TP1 too


@dataclass
class Converted:
    name: str
    hf_dir: Path
    ct_dir: Path
    hf_logits: torch.Tensor  # [b, s, vocab] fp32


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 300, (2, 48), generator=g)  # [b, s]


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tokens) -> dict[str, Converted]:
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for name, (model_type, kwargs, files) in CASES.items():
        hf_dir, ct_dir = root / f"{name}_hf", root / f"{name}_ct"
        hf_dir.mkdir()
        model = build_hf_model(model_type, kwargs, hf_dir, files)
        build_tokenizer(hf_dir, kwargs["vocab_size"])
        with torch.no_grad():
            logits = model(tokens).logits.float()
        convert_hf_to_ct(str(hf_dir), str(ct_dir), target_tp=TARGET_TP, progress=False)
        out[name] = Converted(name, hf_dir, ct_dir, logits)
    return out
