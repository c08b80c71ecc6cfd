"""HF model vs our model loaded from the converted checkpoint: same logits at every layout."""

import json

import pytest
import torch
from convert_helpers import CASES, MOE_CASES, run_torchrun

from launch import REPO

pytestmark = pytest.mark.slow
WORKER = REPO / "tests" / "convert" / "logits_worker.py"
LAYOUTS = {"TP1PP1": (1, 1), "TP2": (2, 1), "PP2": (1, 2), "TP2xPP2": (2, 2)}  # name: (tp, pp)


EP_LAYOUTS = {"EP2": (1, 1, 2), "TP2xEP2": (2, 1, 2)}  # name: (tp, pp, ep); world tp x ep, DP = EP


def run_layout(converted, tokens, tmp_path, names, tp, pp, ep=1):
    torch.save(tokens, tmp_path / "tokens.pt")
    cases = [{"ckpt": str(converted[n].ct_dir), "out": str(tmp_path / f"{n}.pt")} for n in names]
    manifest = tmp_path / "manifest.json"
    spec = {"tp": tp, "pp": pp, "ep": ep, "tokens": str(tmp_path / "tokens.pt"), "cases": cases}
    manifest.write_text(json.dumps(spec))
    run_torchrun(tp * pp * ep, WORKER, [str(manifest)])


def check_logits(converted, tmp_path, names, layout):
    for name in names:
        ours = torch.load(tmp_path / f"{name}.pt")
        ref = converted[name].hf_logits
        assert ours.shape == ref.shape, f"{name} {layout}: logits {tuple(ours.shape)} vs HF {tuple(ref.shape)}"
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4, f"{name} at {layout}: max |logits - HF| = {diff:.3g}"
        assert ref.abs().max() > 1.0  # logits are not trivially small


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_hf(converted, tokens, tmp_path, layout):
    """All architectures in one launch per layout (a launch costs more than a tiny model)."""
    tp, pp = LAYOUTS[layout]
    run_layout(converted, tokens, tmp_path, list(CASES), tp, pp)
    check_logits(converted, tmp_path, list(CASES), layout)


@pytest.mark.parametrize("layout", list(EP_LAYOUTS))
def test_moe_logits_match_hf_with_expert_parallelism(converted, tokens, tmp_path, layout):
    """The mixtures of experts with their experts split over ranks (tokens travel all-to-all)."""
    tp, pp, ep = EP_LAYOUTS[layout]
    run_layout(converted, tokens, tmp_path, MOE_CASES, tp, pp, ep)
    check_logits(converted, tmp_path, MOE_CASES, layout)
