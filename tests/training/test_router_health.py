"""Router health of a mixture of experts (megatron_ct/training/router_health.py): expert load
and the routers' losses as megatron-core computes them, dropped token slots, and the one-line
dead-expert warning, and both across a resume. One process, the model built in it (and one
trainer run resumed); the same numbers at EP2 and TP2 x EP2 are checked by
tests/training/test_expert_parallel.py on its runs."""

import logging

import pytest
import torch

from megatron_ct.training.router_health import DeadExperts, RouterHealth, routers

MOE = {"family": "mixtral", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 300}
SEQ, BATCH = 32, 2  # 64 tokens per forward


def build(mcore, **model):
    """A tiny Mixtral in train mode on this process (megatron-core state of ``mcore_tp1``)."""
    from megatron_ct.config import load_config, validate_for_world
    from megatron_ct.model.llama import build_model

    overrides = [f"model.{k}={v}" for k, v in {**MOE, "ffn_hidden_size": 64, **model}.items()]
    cfg = load_config(None, [*overrides, "model.max_position_embeddings=64", "parallel.device=cpu"])
    (chunk,), _ = build_model(cfg.model, validate_for_world(cfg, 1))
    return chunk.train(), cfg.model


def health_of(chunk, m, intervals=None) -> RouterHealth:
    return RouterHealth(
        [chunk],
        num_layers=m.num_layers,
        num_experts=m.num_experts,
        topk=m.moe_router_topk,
        aux_loss=m.moe_aux_loss_coeff > 0,
        z_loss=m.moe_z_loss_coeff > 0,
        dead_expert_intervals=intervals,
    )


def forward(chunk, seed=0):
    """One training forward (gradients on, as in a step) of a random micro-batch."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MOE["vocab_size"], (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    chunk(input_ids=tokens, position_ids=positions, attention_mask=None, labels=tokens)


@pytest.fixture
def cpu_layer(mcore_tp1):
    """megatron-core's MoE dispatcher on CPU (megatron_ct/parallel/device.py); seeded weights."""
    from megatron_ct.parallel.device import activate_cpu_device_layer, deactivate_cpu_device_layer

    torch.manual_seed(1234)
    activate_cpu_device_layer()
    yield mcore_tp1
    deactivate_cpu_device_layer()


def test_load_and_losses_are_the_routers(cpu_layer):
    """Per layer: the expert load is the top-k of the router's logits, a layer's fractions sum to
    1, and the load-balancing loss and z-loss equal both the formulas on those logits and what
    megatron-core's own tracker reports (track_moe_metrics) for the same micro-batch."""
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    chunk, m = build(cpu_layer, num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    health = health_of(chunk, m)
    inputs = {}
    for r in routers([chunk]):  # what each router sees: [s, b, h]
        r.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod.layer_number - 1, args[0].detach()))
    forward(chunk)
    forward(chunk)  # two micro-batches in the interval (the same one twice): means over them
    got = health.report(iteration=1)

    E, k, T = m.num_experts, m.moe_router_topk, SEQ * BATCH
    assert got["moe_dropped_tokens"] == 0
    for layer, r in enumerate(routers([chunk])):
        logits = inputs[layer].reshape(T, -1).float() @ r.weight.detach().float().T  # [T, E]
        counts = torch.bincount(logits.topk(k, dim=1).indices.reshape(-1), minlength=E)
        assert got["moe_expert_load"][layer] == (counts / (T * k)).tolist()
        assert sum(got["moe_expert_load"][layer]) == pytest.approx(1.0)
        aux = E * ((counts / (T * k)) * logits.softmax(dim=1).mean(dim=0)).sum()
        assert got["moe_aux_loss_layers"][layer] == pytest.approx(float(aux), rel=1e-5)
        z = logits.logsumexp(dim=1).square().mean()
        assert got["moe_z_loss_layers"][layer] == pytest.approx(float(z), rel=1e-5)
    assert got["moe_aux_loss"] == pytest.approx(sum(got["moe_aux_loss_layers"]) / m.num_layers)

    forward(chunk)  # the same micro-batch again, reported by megatron-core this time
    theirs: dict = {}
    track_moe_metrics(1.0, 1, total_loss_dict=theirs, num_layers=m.num_layers)
    assert got["moe_aux_loss"] == pytest.approx(float(theirs["load_balancing_loss"]), rel=1e-6)
    assert got["moe_z_loss"] == pytest.approx(float(theirs["z_loss"]), rel=1e-6)
    health.close()


def test_forced_dead_expert_warns_once_and_capacity_drops_are_counted(cpu_layer, caplog):
    """Layer 1's router can never pick expert 2 (top-1 of logits v.x, -v.x, 0): after 2 intervals
    one warning names it, and only once. With a capacity factor of 0.5 the two live experts take
    ceil(64 / 3 * 0.5) = 11 token slots each per micro-batch; the other 42 are dropped and counted."""
    # Qwen3-MoE without renormalisation: megatron-core refuses top-1 of renormalised probabilities.
    top1 = dict(family="qwen3_moe", moe_norm_topk_prob=False, moe_router_topk=1)
    chunk, m = build(cpu_layer, num_experts=3, moe_expert_capacity_factor=0.5, **top1)
    router = routers([chunk])[1]
    with torch.no_grad():
        v = torch.randn(router.weight.shape[1])
        router.weight.copy_(torch.stack([v, -v, torch.zeros_like(v)]))
    health = health_of(chunk, m, intervals=2)
    records = []
    with caplog.at_level(logging.WARNING, logger="megatron_ct"):
        for it in range(1, 5):
            forward(chunk, seed=it)
            records.append(health.report(iteration=it))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dead expert:")]
    assert lines == [
        "dead expert: layer 1, expert 2 received no tokens in 2 consecutive log intervals (up to iteration 2; "
        "logging.moe_dead_expert_intervals=2)"
    ]
    for r in records:
        assert r["moe_expert_load"][1] == [11 / 64, 11 / 64, 0.0]
        assert r["moe_dropped_tokens"] >= 42  # layer 1's, and any of layer 0's
        assert r["moe_dropped_tokens"] == round(64 * (2 - sum(map(sum, r["moe_expert_load"]))))
        assert "moe_aux_loss" not in r  # megatron-core computes none with the coefficient at 0
    health.close()


def test_saved_interval_reports_the_same_at_another_layout(cpu_layer):
    """A checkpoint holds the open interval in layout-free units: loaded where TP2 ranks see the
    same tokens (counts twice over) and split the losses (TP x CP = 2), the writer's carried sums
    report what the saving run would have, and the dead-expert count goes on where it was."""
    chunk, m = build(cpu_layer, num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    saver = health_of(chunk, m, intervals=3)
    saver.dead.update(0, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))  # layer 0's expert 3 idle once
    forward(chunk, seed=1)
    forward(chunk, seed=2)
    state = saver.state_dict()
    expected = saver.report(iteration=2)
    saver.close()
    assert state["micro_batches"] == [2, 2] and state["dead_experts"] == {"idle": [[0, 0, 0, 1], [0] * 4], "warned": []}

    resumed = RouterHealth(
        [], num_layers=2, num_experts=4, topk=2, aux_loss=True, z_loss=True, token_copies=2, tp_cp=2,
        dead_expert_intervals=3,
    )  # fmt: skip
    resumed.load_state_dict(state)
    assert resumed.dead.state_dict() == state["dead_experts"]
    got = resumed.report(iteration=2)
    assert got["moe_expert_load"] == expected["moe_expert_load"]
    for key in ("moe_aux_loss_layers", "moe_z_loss_layers"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    assert resumed.dead.state_dict() == saver.dead.state_dict()  # both counted the interval on top
    assert resumed.report(iteration=3)["moe_expert_load"] == [[0.0] * 4] * 2  # carried once, then cleared


def test_dead_expert_warns_again_only_after_it_recovered(caplog):
    dead = DeadExperts(intervals=2)
    alive, silent = torch.tensor([[5, 3]]), torch.tensor([[5, 0]])
    with caplog.at_level(logging.WARNING, logger="megatron_ct"):
        got = [dead.update(it, c) for it, c in enumerate([silent, silent, silent, alive, silent, silent], 1)]
    assert [len(lines) for lines in got] == [0, 1, 0, 0, 0, 1]
    assert "layer 0, expert 1" in got[1][0] and "up to iteration 6" in got[5][0]
    assert caplog.text.count("dead expert:") == 2
    assert DeadExperts(intervals=None).update(9, torch.zeros(2, 2)) == []


# --- through the trainer: the open interval and the dead-expert count in the checkpoint -------
DEAD = 3  # the expert no token reaches (see dead_expert_checkpoint)
RESUME = [
    "model.moe_aux_loss_coeff=0.01",
    "model.moe_z_loss_coeff=0.001",
    "train.train_iters=6",
    "logging.log_interval=2",
    "logging.moe_dead_expert_intervals=2",
]


def dead_expert_checkpoint(root) -> str:
    """tests/launch.py's tiny Mixtral with expert 3 dead in both layers: hidden coordinate 0 is
    a large positive constant of every token's embedding (the residual stream keeps it), and
    expert 3's router row is -1 there and 0 elsewhere, so its logit is far below the others'."""
    from tiny_checkpoint import write_like, write_random_checkpoint

    from launch import MIXTRAL

    def edit(key, t):
        if key == "embedding.word_embeddings.weight":
            t[:, 0] = 3.0
        elif key == "decoder.layers.mlp.router.weight":  # [L, E, H]
            t[:, :, 0] = 0.0
            t[:, DEAD] = 0.0
            t[:, DEAD, 0] = -1.0
        return t

    write_random_checkpoint(root / "random", seed=5, **MIXTRAL)
    return write_like(root / "random", root / "init", seed=5, edit=edit)


def moe_fields(records: list[dict]) -> dict[int, dict]:
    return {r["iteration"]: {k: v for k, v in r.items() if k.startswith("moe_")} for r in records}


def dead_warnings(proc) -> list[str]:
    return [line.split("] ", 1)[1] for line in proc.stderr.splitlines() if "] dead expert:" in line]


@pytest.mark.slow
def test_resume_mid_interval_reports_and_warns_as_the_uninterrupted_run(tmp_path):
    """One process, logs every 2 steps, a save at step 3 (inside the interval 3-4). Resumed from
    it, the run reports steps 3-4 as one interval with the same expert loads and router losses
    as the run that went on, and warns about the dead expert at iteration 4 as that run does
    (the count of idle intervals includes the one logged before the save)."""
    from launch import TINY_MIXTRAL, read_metrics, run_trainer

    init = dead_expert_checkpoint(tmp_path)
    common = [*TINY_MIXTRAL, *RESUME]
    straight = tmp_path / "straight"
    first = run_trainer(
        1,
        [*common, f"checkpoint.load={init}", "checkpoint.load_weights_only=true"]
        + [f"checkpoint.save={straight}", "checkpoint.save_interval=3"],
    )
    resumed = run_trainer(
        1, [*common, f"checkpoint.load={straight / 'iter_0000003'}", f"logging.log_dir={tmp_path / 'resumed'}"]
    )
    warned = [
        f"dead expert: layer {layer}, expert {DEAD} received no tokens in 2 consecutive log intervals (up to "
        "iteration 4; logging.moe_dead_expert_intervals=2)"
        for layer in (0, 1)
    ]
    assert dead_warnings(first) == warned
    assert dead_warnings(resumed) == warned
    ref, got = moe_fields(read_metrics(straight)), moe_fields(read_metrics(tmp_path / "resumed"))
    assert sorted(ref) == [2, 4, 6] and sorted(got) == [4, 6]
    for it in (4, 6):
        assert got[it]["moe_expert_load"] == ref[it]["moe_expert_load"], f"iteration {it}"
        assert all(layer[DEAD] == 0.0 for layer in got[it]["moe_expert_load"])
        for key in ("moe_aux_loss_layers", "moe_z_loss_layers"):
            assert got[it][key] == pytest.approx(ref[it][key], rel=1e-6), f"iteration {it}: {key}"
