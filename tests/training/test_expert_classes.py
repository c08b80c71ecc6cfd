"""A mixture of experts' experts and routers as their own parameter classes: frozen, or at their
own learning rate, at EP2 with megatron-core's distributed optimizer (expert weights live in its
expert-parallel buffer and optimizer) (issue 27)."""

import pytest
from tiny_checkpoint import read_all, write_random_checkpoint

from megatron_ct.config import load_config
from megatron_ct.errors import ConfigError
from megatron_ct.training.freeze import expand_patterns, param_class

from launch import MIXTRAL, TINY_MIXTRAL, losses, read_metrics, run_trainer

EP2 = [
    *TINY_MIXTRAL,
    "parallel.expert_model_parallel_size=2",
    "parallel.use_distributed_optimizer=true",
    "checkpoint.load_weights_only=true",
]
EXPERTS = "decoder.layers.mlp.experts.experts."
ROUTER = "decoder.layers.mlp.router.weight"
LR = 1e-3  # tests/launch.py's optim.lr


def test_expert_and_router_names_are_their_own_classes():
    expert = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    router = "decoder.layers.1.mlp.router.weight"
    assert param_class(expert, None) == "experts" and param_class(router, None) == "router"
    assert param_class("decoder.layers.1.self_attention.linear_qkv.weight", None) == "body"
    assert param_class(expert, [1]) == "new_blocks"  # a new block learns as one
    assert expand_patterns(["experts", "router"], None) == [
        "decoder.layers.*.mlp.experts.*",
        "decoder.layers.*.mlp.router.*",
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr_mult={experts: 0}", r"^train.lr_mult.experts: expected 'experts' only for a mixture of experts"),
        ("train.trainable_params=[router]", r"^train.trainable_params: expected 'router' only for a mixture of"),
    ],
)
def test_expert_classes_on_a_dense_model_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_classes")
    write_random_checkpoint(root / "init", seed=4, **MIXTRAL)
    return root


def train(root, name: str, flags: list[str]) -> tuple[dict, dict, list[dict]]:
    out = root / name
    run_trainer(2, [*EP2, f"checkpoint.load={root / 'init'}", f"checkpoint.save={out}", *flags])
    return read_all(root / "init"), read_all(out), read_metrics(out)


@pytest.mark.slow
def test_frozen_experts_stay_bit_identical(init):
    """lr_mult {experts: 0}: every expert weight (both EP ranks' halves) is saved bit-identical
    after two steps; the router and every other tensor learn."""
    before, after, metrics = train(init, "frozen", ["train.train_iters=2", "train.lr_mult={experts: 0}"])
    experts = {k for k in before if k.startswith(EXPERTS)}
    assert len(experts) == 2 and all(before[k].shape[:2] == (2, 4) for k in experts)
    changed = {k for k in before if not before[k].equal(after[k])}
    assert changed == set(before) - experts
    assert all(r["lr_experts"] == 0.0 and r["lr_router"] == r["lr_body"] == r["lr"] > 0 for r in metrics)


@pytest.mark.slow
def test_experts_and_router_step_at_their_multipliers(init):
    """One Adam step (no weight decay) moves an element by lr x multiplier x g / (|g| + eps), so a
    tensor's largest move is its class's LR. Expert 3 is rank 1's local expert 1: the pattern
    names it by its global index and only it trains (experts 0-2 of its stack stay at LR 0)."""
    trainable = "[router, 'decoder.layers.*.mlp.experts.local_experts.3.*', 'decoder.layers.*.self_attention.*']"
    flags = ["train.train_iters=1", "optim.weight_decay=0", "train.lr_mult={experts: 0.5, router: 2}"]
    before, after, metrics = train(init, "mult", [*flags, f"train.trainable_params={trainable}"])
    step = {k: (after[k] - before[k]).abs() for k in before}
    for key in (EXPERTS + "linear_fc1.weight", EXPERTS + "linear_fc2.weight"):
        assert step[key][:, :3].eq(0).all(), f"{key}: experts 0-2 moved"
        assert step[key][:, 3].max().item() == pytest.approx(0.5 * LR, rel=1e-3), key
    assert step[ROUTER].max().item() == pytest.approx(2 * LR, rel=1e-3)
    attention = [k for k in before if ".self_attention." in k and "norm" not in k]
    assert attention and all(step[k].max().item() == pytest.approx(LR, rel=1e-3) for k in attention)
    frozen = [k for k in before if not k.startswith(EXPERTS) and k != ROUTER and ".self_attention." not in k]
    assert frozen and all(step[k].eq(0).all() for k in frozen), [k for k in frozen if not step[k].eq(0).all()]
    assert metrics[0]["lr_experts"] == pytest.approx(0.5 * LR) and metrics[0]["lr_router"] == pytest.approx(2 * LR)


@pytest.mark.slow
def test_all_experts_frozen_resume_exactly(init):
    """trainable_params without the experts, at EP2 with the distributed optimizer: no expert
    parameter trains, so megatron-core builds no expert optimizer (the dense one alone, as at
    EP 1). Saved at step 2 and resumed, the run's losses at steps 3-4 and its final weights equal
    the run that went on, and every expert weight is bit-identical to the initial one in both
    checkpoints and after the resume."""
    trainable = "[embeddings, router, 'decoder.layers.*.self_attention.*', 'decoder.final_layernorm.*']"
    flags = [*EP2, "train.train_iters=4", f"train.trainable_params={trainable}"]
    straight, resumed = init / "frozen_all", init / "frozen_all_resumed"
    run_trainer(
        2, [*flags, f"checkpoint.load={init / 'init'}", f"checkpoint.save={straight}", "checkpoint.save_interval=2"]
    )
    load = [f"checkpoint.load={straight / 'iter_0000002'}", "checkpoint.load_weights_only=false"]
    run_trainer(2, [*flags, *load, f"checkpoint.save={resumed}"])

    ref, got = losses(straight), losses(resumed)
    assert sorted(got) == [3, 4] and [got[i] for i in (3, 4)] == [ref[i] for i in (3, 4)]
    before, final = read_all(init / "init"), read_all(straight)
    experts = {k for k in before if k.startswith(EXPERTS)}
    assert len(experts) == 2
    for ckpt in (straight / "iter_0000002", straight, resumed):
        saved = read_all(ckpt)
        assert all(saved[k].equal(before[k]) for k in experts), f"{ckpt.name}: an expert weight moved"
    after = read_all(resumed)
    assert all(after[k].equal(final[k]) for k in final), "the resumed run's weights differ from the straight run's"
    changed = {k for k in before if not before[k].equal(final[k])}
    assert {ROUTER, "decoder.layers.self_attention.linear_qkv.weight", "embedding.word_embeddings.weight"} <= changed
