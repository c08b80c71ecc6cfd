"""Sparse upcycling: a dense checkpoint becomes a mixture of experts of its MLP's copies, which
computes the dense model's function (issue 27)."""

import pytest
import torch
from tiny_checkpoint import read_all, write_random_checkpoint

from megatron_ct.checkpoint.meta import read_meta
from megatron_ct.checkpoint.root import resolve_load_dir
from megatron_ct.config import ModelConfig
from megatron_ct.errors import ConversionError
from megatron_ct.expansion.upcycle import upcycle

from launch import REPO, losses, run_torchrun, run_trainer

DENSE = {"num_layers": 2}  # tests/tiny_checkpoint.py's TINY_MODEL otherwise (ffn 128)
FC1, FC2 = "decoder.layers.mlp.linear_fc1.weight", "decoder.layers.mlp.linear_fc2.weight"
EXPERTS = "decoder.layers.mlp.experts.experts."


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycle")
    write_random_checkpoint(root / "dense", seed=5, **DENSE)
    return root


def test_experts_are_copies_and_the_config_is_the_moe_family(dense):
    plan, model = upcycle(str(dense / "dense"), str(dense / "moe"), num_experts=4, topk=2)
    assert (plan.dense, plan.family) == ("llama", "mixtral")
    before, after = read_all(dense / "dense"), read_all(dense / "moe")
    assert after[EXPERTS + "linear_fc1.weight"].shape == (2, 4, 256, 64)  # [L, E, 2f, h]
    assert after[EXPERTS + "linear_fc2.weight"].shape == (2, 4, 64, 128)
    for e in range(4):
        assert torch.equal(after[EXPERTS + "linear_fc1.weight"][:, e], before[FC1])
        assert torch.equal(after[EXPERTS + "linear_fc2.weight"][:, e], before[FC2])
    assert after["decoder.layers.mlp.router.weight"].shape == (2, 4, 64)
    assert FC1 not in after and all(torch.equal(after[k], t) for k, t in before.items() if k not in (FC1, FC2))
    saved = read_meta(resolve_load_dir(str(dense / "moe"))[0]).model
    assert saved == model and ModelConfig(**saved).num_experts == 4
    assert (saved["family"], saved["moe_ffn_hidden_size"], saved["moe_router_topk"]) == ("mixtral", 128, 2)


def test_noise_perturbs_each_expert_differently(dense):
    upcycle(str(dense / "dense"), str(dense / "noisy"), num_experts=3, topk=2, noise=0.01, seed=1)
    w, ref = read_all(dense / "noisy")[EXPERTS + "linear_fc1.weight"], read_all(dense / "dense")[FC1]
    rel = [((w[:, e] - ref).std() / ref.std()).item() for e in range(3)]
    assert all(0.005 < r < 0.02 for r in rel) and not torch.equal(w[:, 0], w[:, 1])


def test_fine_grained_experts_are_scaled_slices_with_tied_router_rows(dense):
    """granularity 2: expert e is half e % 2 of the MLP (gate and up rows, down columns x 2) and
    the router rows are equal within each pair: the layer still computes the dense MLP."""
    plan, model = upcycle(str(dense / "dense"), str(dense / "fine"), num_experts=4, topk=2, granularity=2)
    before, after = read_all(dense / "dense"), read_all(dense / "fine")
    fc1, fc2 = after[EXPERTS + "linear_fc1.weight"], after[EXPERTS + "linear_fc2.weight"]
    assert fc1.shape == (2, 4, 128, 64) and fc2.shape == (2, 4, 64, 64)  # [L, E, 2f/G, h], [L, E, h, f/G]
    gate, up = before[FC1].chunk(2, dim=1)
    for e in range(4):
        s = slice(64 * (e % 2), 64 * (e % 2 + 1))
        assert torch.equal(fc1[:, e], torch.cat([gate[:, s], up[:, s]], dim=1))
        assert torch.equal(fc2[:, e], 2 * before[FC2][:, :, s])
    router = after["decoder.layers.mlp.router.weight"]
    assert torch.equal(router[:, 0], router[:, 1]) and torch.equal(router[:, 2], router[:, 3])
    assert not torch.equal(router[:, 0], router[:, 2])
    meta = read_meta(resolve_load_dir(str(dense / "fine"))[0])
    assert (meta.model["moe_ffn_hidden_size"], meta.model["ffn_hidden_size"]) == (64, 128)
    assert meta.expansion["upcycle"]["granularity"] == 2 and plan.granularity == 2


def test_fine_grained_upcycle_exported_to_mixtral_computes_the_dense_llama(dense, tmp_path):
    """What a user checks in transformers: the granularity-2 upcycle (8 half-width experts, top 2)
    exported as MixtralForCausalLM gives the dense model's LlamaForCausalLM logits (HF's own
    router: softmax, top 2 of tied pairs, renormalised)."""
    from transformers import AutoModelForCausalLM

    from megatron_ct.convert.ct_to_hf import convert_ct_to_hf

    upcycle(str(dense / "dense"), str(tmp_path / "fine"), num_experts=8, topk=2, granularity=2)
    for name, src in (("dense_hf", dense / "dense"), ("fine_hf", tmp_path / "fine")):
        convert_ct_to_hf(str(src), str(tmp_path / name), progress=False)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dense_hf").eval()
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "fine_hf").eval()
    assert (type(ref).__name__, type(moe).__name__) == ("LlamaForCausalLM", "MixtralForCausalLM")
    assert (moe.config.intermediate_size, moe.config.num_local_experts, moe.config.num_experts_per_tok) == (64, 8, 2)
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_refusals_are_one_line(dense):
    with pytest.raises(ConversionError, match=r"--topk 5: expected an integer in \[2, --num-experts=4\] "):
        upcycle(str(dense / "dense"), str(dense / "x"), num_experts=4, topk=5)
    with pytest.raises(ConversionError, match=r"--topk 1: expected an integer in \[2, --num-experts=4\] \(top-1"):
        upcycle(str(dense / "dense"), str(dense / "x"), num_experts=4, topk=1)
    with pytest.raises(ConversionError, match=r"--granularity 3: expected an integer >= 1 dividing the MLP width "):
        upcycle(str(dense / "dense"), str(dense / "x"), num_experts=6, topk=3, granularity=3)
    with pytest.raises(ConversionError, match=r"--num-experts 6: expected a multiple of --granularity=4 "):
        upcycle(str(dense / "dense"), str(dense / "x"), num_experts=6, topk=4, granularity=4)
    with pytest.raises(ConversionError, match=r"--topk 3: expected a multiple of --granularity=2 "):
        upcycle(str(dense / "dense"), str(dense / "x"), num_experts=4, topk=3, granularity=2)
    write_random_checkpoint(dense / "qwen2", seed=5, family="qwen2", **DENSE)
    with pytest.raises(ConversionError, match=r"model.family=qwen2: no mixture-of-experts family has its layers"):
        upcycle(str(dense / "qwen2"), str(dense / "x"), num_experts=4, topk=2)


@pytest.mark.slow
def test_first_step_loss_equals_the_dense_model(dense):
    """The tool as a user runs it, then one trainer step on each model: the same loss (the
    experts are copies and the top-k weights sum to 1; or, at granularity 2, scaled halves of the
    MLP chosen in whole pairs); the upcycled model then trains."""
    proc = run_torchrun(
        1,
        REPO / "tools" / "upcycle_moe.py",
        ["--input", str(dense / "dense"), "--output", str(dense / "cli"), "--num-experts", "4", "--topk", "2"],
    )
    line = proc.stdout + proc.stderr
    assert "llama -> mixtral: 2 layers x 4 experts of 128, top 2; run with model.family=mixtral" in line
    common = ["model.num_layers=2", "checkpoint.load_weights_only=true", "train.train_iters=2"]
    moe = ["model.family=mixtral", "model.num_experts=4", "model.moe_ffn_hidden_size=128", "model.moe_router_topk=2"]
    run_trainer(1, [*common, f"checkpoint.load={dense / 'dense'}", f"logging.log_dir={dense / 'log_dense'}"])
    run_trainer(1, [*common, *moe, f"checkpoint.load={dense / 'cli'}", f"logging.log_dir={dense / 'log_moe'}"])
    ref, got = losses(dense / "log_dense"), losses(dense / "log_moe")
    assert got[1] == pytest.approx(ref[1], rel=1e-6), f"upcycled {got[1]} vs dense {ref[1]}"
    assert got[2] < got[1]
    # Fine-grained: 8 experts of half the MLP, 2 per token = the dense model's active parameters.
    plan, model = upcycle(str(dense / "dense"), str(dense / "fine8"), num_experts=8, topk=2, granularity=2)
    fine = [f"model.{k}={v}" for k, v in plan.model_fields(model["ffn_hidden_size"]).items()]
    run_trainer(1, [*common, *fine, f"checkpoint.load={dense / 'fine8'}", f"logging.log_dir={dense / 'log_fine'}"])
    got = losses(dense / "log_fine")
    assert got[1] == pytest.approx(ref[1], rel=1e-6), f"fine-grained upcycle {got[1]} vs dense {ref[1]}"
    assert got[2] < got[1]
