"""Expert parallelism on CPU (gloo): a mixture of experts trained with its experts split over two
ranks takes the steps the single process takes (issue 27)."""

import pytest
import torch

from launch import losses, read_metrics, run_trainer

pytestmark = pytest.mark.slow

# The trainer's tiny model (tests/launch.py) as a Mixtral of 2 layers with 4 experts of 64, 2
# per token, and megatron-core's load-balancing loss on (its gradient crosses the ranks too).
MOE = {"family": "mixtral", "num_layers": 2, "ffn_hidden_size": 64, "num_experts": 4, "moe_ffn_hidden_size": 64}
OVERRIDES = [
    *(f"model.{k}={v}" for k, v in MOE.items()),
    "model.moe_router_topk=2",
    "model.moe_aux_loss_coeff=0.01",
    "train.train_iters=3",
    "checkpoint.load_weights_only=true",
]


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """The same initial weights for every layout, written directly (experts are initialised per
    expert-parallel rank, so a seed alone would give each layout other weights)."""
    from tiny_checkpoint import write_random_checkpoint

    root = tmp_path_factory.mktemp("ep")
    write_random_checkpoint(root / "init", seed=3, **MOE)
    return root


def run(root, name, nproc, flags):
    out = root / name
    overrides = [f"checkpoint.load={root / 'init'}", f"checkpoint.save={out / 'ckpt'}", f"logging.log_dir={out}"]
    run_trainer(nproc, [*OVERRIDES, *overrides, *flags])
    return losses(out), {r["iteration"]: r["grad_norm"] for r in read_metrics(out)}


def test_ep2_steps_equal_one_process(init):
    """Per-step losses and gradient norms (every expert's gradient is in it, and each step's
    update feeds the next loss) of EP2 x DP2 equal the single process's, and so do the weights
    it saves (each rank writes its own experts into the global [L, E, ...] tensors)."""
    from tiny_checkpoint import read_all

    ref, ref_norms = run(init, "ref", 1, [])
    got, norms = run(init, "ep2", 2, ["parallel.expert_model_parallel_size=2"])
    assert sorted(got) == [1, 2, 3]
    for it in (1, 2, 3):
        assert got[it] == pytest.approx(ref[it], rel=1e-5), f"EP2 iteration {it}: {got[it]} vs EP1 {ref[it]}"
        assert norms[it] == pytest.approx(ref_norms[it], rel=1e-5), f"EP2 iteration {it}: grad norm"
    assert ref[3] < ref[1]  # the updates move the loss, so equal losses say the updates are equal
    before, ours, theirs = read_all(init / "init"), read_all(init / "ref" / "ckpt"), read_all(init / "ep2" / "ckpt")
    experts = [k for k in before if ".experts." in k]
    assert len(experts) == 2 and all(ours[k].shape[:2] == (2, 4) for k in experts)
    for key, t in ours.items():
        if key in before:
            assert torch.allclose(theirs[key], t, atol=1e-6), f"{key} differs between the EP2 and EP1 saves"
            assert not torch.equal(t, before[key]), f"{key} did not train"
