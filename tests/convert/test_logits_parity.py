"""HF model vs our model loaded from the converted checkpoint: same logits at every layout."""

import json

import pytest
import torch
from convert_helpers import CASES, run_torchrun

from launch import REPO

pytestmark = pytest.mark.slow
WORKER = REPO / "tests" / "convert" / "logits_worker.py"
LAYOUTS = {"TP1PP1": (1, 1), "TP2": (2, 1), "PP2": (1, 2), "TP2xPP2": (2, 2)}  # name: (tp, pp)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_hf(converted, tokens, tmp_path, layout):
    """All architectures in one launch per layout (a launch costs more than a tiny model)."""
    tp, pp = LAYOUTS[layout]
    torch.save(tokens, tmp_path / "tokens.pt")
    cases = [{"ckpt": str(c.ct_dir), "out": str(tmp_path / f"{name}.pt")} for name, c in converted.items()]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"tp": tp, "pp": pp, "tokens": str(tmp_path / "tokens.pt"), "cases": cases}))
    run_torchrun(tp * pp, WORKER, [str(manifest)])
    for name in CASES:
        ours = torch.load(tmp_path / f"{name}.pt")
        ref = converted[name].hf_logits
        assert ours.shape == ref.shape, f"{name} {layout}: logits {tuple(ours.shape)} vs HF {tuple(ref.shape)}"
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4, f"{name} at {layout}: max |logits - HF| = {diff:.3g}"
        assert ref.abs().max() > 1.0  # logits are not trivially small
