"""LLaMA-Pro block expansion: same function after expansion; only new blocks learn."""

import json

import pytest
import torch

from megatron_ct.checkpoint.dist_io import DistCheckpointReader
from megatron_ct.expansion.blocks import ExpansionPlan

from launch import REPO, run_torchrun, run_trainer

pytestmark = pytest.mark.slow
WORKER = REPO / "tests" / "convert" / "logits_worker.py"


def test_plan():
    plan = ExpansionPlan.make(num_layers=4, every=2, add=1)
    assert plan.sources == (0, 1, 1, 2, 3, 3) and plan.new_layers == (2, 5)
    with pytest.raises(ValueError, match="--every 3: expected a divisor of the model's 4 layers"):
        ExpansionPlan.make(4, 3, 1)


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    root = tmp_path_factory.mktemp("pro")
    # A base with non-trivial weights (a few steps trained), saved at TP2 to show layout-freedom.
    run_trainer(2, ["train.train_iters=3", "--tensor-model-parallel-size", "2", f"checkpoint.save={root / 'base'}"])
    proc = run_torchrun(
        1,
        REPO / "tools" / "expand_blocks.py",
        ["--input", str(root / "base"), "--output", str(root / "pro"), "--every", "2"],
    )
    assert "4 -> 6 layers; new layers [2, 5]" in proc.stdout + proc.stderr
    return root


def logits(root, ckpt, tp, pp, nproc, name):
    tokens = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, root / "tokens.pt")
    manifest = root / f"{name}.json"
    manifest.write_text(
        json.dumps(
            {
                "tp": tp,
                "pp": pp,
                "tokens": str(root / "tokens.pt"),
                "cases": [{"ckpt": str(ckpt), "out": str(root / f"{name}.pt")}],
            }
        )
    )
    run_torchrun(nproc, WORKER, [str(manifest)])
    return torch.load(root / f"{name}.pt")


def test_expanded_model_computes_the_same_logits(expanded):
    root = expanded
    before = logits(root, root / "base", 1, 1, 1, "base")
    after = logits(root, root / "pro", 1, 2, 2, "pro")  # 6 layers over 2 stages
    assert torch.allclose(before, after, atol=1e-5, rtol=0), (before - after).abs().max()


def test_training_new_blocks_leaves_old_ones_bit_identical(expanded):
    root = expanded
    run_trainer(
        2,
        [
            "model.num_layers=6",
            "--pipeline-model-parallel-size",
            "2",
            "train.train_iters=3",
            "train.trainable_params=new_blocks",
            f"checkpoint.load={root / 'pro'}",
            "checkpoint.load_weights_only=true",
            f"checkpoint.save={root / 'trained'}",
        ],
    )
    before = DistCheckpointReader(str(root / "pro" / "iter_0000000"))
    after = DistCheckpointReader(str(root / "trained" / "iter_0000003"))
    moved = set()
    for key in before.tensors:
        a, b = before.read(key), after.read(key)
        if key.startswith("decoder.layers."):
            moved |= {(key, i) for i in range(a.shape[0]) if not a[i].equal(b[i])}
        else:
            assert a.equal(b), key
    assert {i for _, i in moved} == {2, 5}
    assert ("decoder.layers.mlp.linear_fc2.weight", 5) in moved  # the zeroed projections learn
