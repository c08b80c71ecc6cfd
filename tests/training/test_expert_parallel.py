"""Expert parallelism on CPU (gloo): a mixture of experts trained with its experts split over two
ranks takes the steps the single process takes, and reports the same router health (issue 27)."""

import pytest
import torch

from launch import MIXTRAL, TINY_MIXTRAL, losses, read_metrics, run_trainer

pytestmark = pytest.mark.slow

# The trainer's tiny model (tests/launch.py) as a Mixtral of 2 layers with 4 experts of 64, 2
# per token, and megatron-core's load-balancing loss on (its gradient crosses the ranks too).
OVERRIDES = [
    *TINY_MIXTRAL,
    "model.moe_aux_loss_coeff=0.01",
    "train.train_iters=3",
    "checkpoint.load_weights_only=true",
]
ROUTER = "decoder.layers.mlp.router.weight"
Z_LOSS = "model.moe_z_loss_coeff=0.01"  # the router z-loss too (its gradient crosses TP ranks)
# The experts and the router at their own LR (megatron_ct/training/freeze.py classes).
LR_CLASSES = "train.lr_mult={experts: 0.5, router: 2}"


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """The same initial weights for every layout, written directly (experts are initialised per
    expert-parallel rank, so a seed alone would give each layout other weights)."""
    from tiny_checkpoint import write_random_checkpoint

    root = tmp_path_factory.mktemp("ep")
    write_random_checkpoint(root / "init", seed=3, **MIXTRAL)
    return root


def run(root, name, nproc, flags):
    out = root / name
    overrides = [f"checkpoint.load={root / 'init'}", f"checkpoint.save={out / 'ckpt'}", f"logging.log_dir={out}"]
    run_trainer(nproc, [*OVERRIDES, *overrides, *flags])
    return losses(out), {r["iteration"]: r["grad_norm"] for r in read_metrics(out)}, read_metrics(out)


def assert_same_router_health(got: list[dict], ref: list[dict], layout: str) -> None:
    """Per step and layer: the expert load (exact counts, summed over the ranks that routed
    them), the load-balancing loss and the z-loss equal one process's (megatron_ct/training/
    router_health.py)."""
    for mine, theirs in zip(got, ref, strict=True):
        it = mine["iteration"]
        assert mine["moe_expert_load"] == theirs["moe_expert_load"], f"{layout} iteration {it}: expert load"
        assert all(sum(layer) == pytest.approx(1.0) for layer in mine["moe_expert_load"]), "dropless"
        assert mine["moe_dropped_tokens"] == 0
        for key in ("moe_aux_loss_layers", "moe_z_loss_layers"):
            assert (key in mine) == (key in theirs), f"{layout}: {key}"
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), f"{layout} iteration {it}: {key}"


@pytest.fixture(scope="module")
def ref(init):
    return run(init, "ref", 1, [])


@pytest.fixture(scope="module")
def ref_z(init):
    return run(init, "ref_z", 1, [Z_LOSS, LR_CLASSES])


def test_ep2_steps_equal_one_process(init, ref):
    """Per-step losses and gradient norms (every expert's gradient is in it, and each step's
    update feeds the next loss) of EP2 x DP2 equal the single process's, and so do the weights
    it saves (each rank writes its own experts into the global [L, E, ...] tensors)."""
    from tiny_checkpoint import read_all

    ref, ref_norms, ref_records = ref
    got, norms, records = run(init, "ep2", 2, ["parallel.expert_model_parallel_size=2"])
    assert_same_router_health(records, ref_records, "EP2")
    assert sorted(got) == [1, 2, 3]
    for it in (1, 2, 3):
        assert got[it] == pytest.approx(ref[it], rel=1e-5), f"EP2 iteration {it}: {got[it]} vs EP1 {ref[it]}"
        assert norms[it] == pytest.approx(ref_norms[it], rel=1e-5), f"EP2 iteration {it}: grad norm"
    assert ref[3] < ref[1]  # the updates move the loss, so equal losses say the updates are equal
    before, ours, theirs = read_all(init / "init"), read_all(init / "ref" / "ckpt"), read_all(init / "ep2" / "ckpt")
    experts = [k for k in before if ".experts." in k]
    assert len(experts) == 2 and all(ours[k].shape[:2] == (2, 4) for k in experts)
    # Three Adam steps at lr 1e-3 move a weight up to ~3e-3; a misplaced or untrained expert
    # differs by that much or more. Reduction order alone gives up to ~2e-6 on some CPUs (Adam's
    # m/sqrt(v) magnifies it where gradients are tiny), so 1% of one step is the tolerance.
    for key, t in ours.items():
        if key in before:
            assert torch.allclose(theirs[key], t, rtol=0, atol=1e-5), f"{key} differs between the EP2 and EP1 saves"
            assert not torch.equal(t, before[key]), f"{key} did not train"


def test_tp2_ep2_sp_steps_equal_one_process(init, ref_z):
    """TP2 x EP2 with sequence parallelism (4 ranks). Two things had to be fixed for it:
    megatron-core 0.16.1 scales the load-balancing loss's and the z-loss's gradients by a rank's
    share of the micro-batch's tokens (TP times too small under SP unless the coefficients are
    compensated: megatron_ct/model/llama.py moe_settings), and its dispatcher all-gathers the uneven token
    counts over TP ranks, which gloo refuses (padded on CPU: megatron_ct/parallel/device.py).
    Both runs give the experts and the router their own LR (x0.5, x2): every tensor, each one
    split over TP and EP ranks as megatron-core splits it, moves as far as at one process."""
    from tiny_checkpoint import read_all

    ref, ref_norms, ref_records = ref_z
    flags = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", Z_LOSS, LR_CLASSES]
    got, norms, records = run(init, "tp2ep2", 4, [*flags, "parallel.expert_model_parallel_size=2"])
    assert_same_router_health(records, ref_records, "TP2xEP2")
    for it in (1, 2, 3):
        assert got[it] == pytest.approx(ref[it], rel=1e-5), f"TP2xEP2 iteration {it}: {got[it]} vs one {ref[it]}"
        assert norms[it] == pytest.approx(ref_norms[it], rel=1e-5), f"TP2xEP2 iteration {it}: grad norm"
    lr = records[0]["lr"]
    assert records[0]["lr_experts"] == pytest.approx(0.5 * lr) and records[0]["lr_router"] == pytest.approx(2 * lr)
    before, ours, theirs = (
        read_all(init / "init"),
        read_all(init / "ref_z" / "ckpt"),
        read_all(init / "tp2ep2" / "ckpt"),
    )
    # Per tensor: the same largest step and the same update up to 1e-3 of its norm (Adam divides each
    # gradient element by its own size: an element whose gradient is about 0 steps by the rounding
    # of its layout's reductions; 1e-4 of the update's norm measured).
    largest = {}
    for key, t in ours.items():
        if key in before:
            step, here = t - before[key], theirs[key] - before[key]
            assert (here - step).norm() <= 1e-3 * step.norm(), f"{key}: TP2xEP2 updated it otherwise"
            largest[key] = step.abs().max().item()
            assert here.abs().max().item() == pytest.approx(largest[key], rel=1e-4), f"{key}: largest step"
    experts = [k for k in largest if ".experts." in k]
    # Three Adam steps move an element at most about 3 x its LR: the experts' (x0.5) < 1.6 lr, while
    # the router's (x2) first step alone moves its elements by about 2 lr.
    assert len(experts) == 2 and max(largest[k] for k in experts) < 1.6 * lr < largest[ROUTER]


def test_training_at_tp2_without_sequence_parallelism_is_one_line():
    from megatron_ct.config import load_config, validate_for_world
    from megatron_ct.errors import ConfigError
    from megatron_ct.model.llama import Numerics, transformer_config

    overrides = [f"model.{k}={v}" for k, v in MIXTRAL.items()] + ["parallel.tensor_model_parallel_size=2"]
    cfg = load_config(None, [*overrides, "parallel.device=cpu"])
    layout = validate_for_world(cfg, 2)
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel: expected true to train model family mixtral"):
        transformer_config(cfg.model, layout, Numerics(ddp=True))
