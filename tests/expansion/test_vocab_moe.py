"""Vocabulary expansion of a mixture of experts (Mixtral, Qwen3-MoE): experts and routers copied,
the logits of old tokens unchanged with the experts split over ranks, and the resized model
trains its new rows and experts at EP2 (issue 27)."""

import json

import pytest
import torch
from tiny_checkpoint import read_all, write_random_checkpoint

from megatron_ct.checkpoint.keys import EMBEDDING, OUTPUT
from megatron_ct.expansion.vocab.checkpoint import resize_ct_checkpoint
from megatron_ct.expansion.vocab.resize import VocabResizePlan

from launch import REPO, run_torchrun, run_trainer

WORKER = REPO / "tests" / "convert" / "logits_worker.py"
MOE = {"num_layers": 2, "ffn_hidden_size": 64, "num_experts": 4, "moe_ffn_hidden_size": 64, "moe_router_topk": 2}
MODELS = {  # untied Mixtral; Qwen3-MoE (q/k norm) with tied embeddings
    "mixtral": {"family": "mixtral", **MOE},
    "qwen3_moe": {"family": "qwen3_moe", "untie_embeddings_and_output_weights": False, **MOE},
}
SOURCES = tuple((i, i + 1, i + 7) for i in range(10, 30))  # 20 appended tokens, each some old pieces
EXPERTS = "decoder.layers.mlp.experts.experts."


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_moe")
    plan = VocabResizePlan(old_vocab_size=500, sources=SOURCES, init="subword_mean", divisible_by=128)
    for i, (name, model) in enumerate(MODELS.items()):
        write_random_checkpoint(root / f"{name}_base", seed=10 + i, **model)
        assert resize_ct_checkpoint(str(root / f"{name}_base"), str(root / f"{name}_big"), plan) == 640
    return root


@pytest.mark.parametrize("name", list(MODELS))
def test_experts_and_router_are_copied(resized, name):
    base, big = read_all(resized / f"{name}_base"), read_all(resized / f"{name}_big")
    assert set(big) == set(base) and (OUTPUT in base) == (name == "mixtral")
    assert {k for k in base if k.startswith(EXPERTS)} and "decoder.layers.mlp.router.weight" in base
    for key in base:
        if key in (EMBEDDING, OUTPUT):
            assert big[key].shape[0] == 640 and big[key][:500].equal(base[key][:500]), key
        else:
            assert big[key].equal(base[key]), key


@pytest.mark.slow
def test_logits_of_old_tokens_unchanged_at_ep2(resized):
    """Both families, base and resized, in one EP2 launch (each rank holds 2 of the 4 experts and
    tokens travel all-to-all): the resized model's logits over the old ids equal the base's."""
    tokens = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, resized / "tokens.pt")
    names = [f"{m}_{v}" for m in MODELS for v in ("base", "big")]
    cases = [{"ckpt": str(resized / n), "out": str(resized / f"{n}.pt")} for n in names]
    manifest = resized / "manifest.json"
    manifest.write_text(json.dumps({"tp": 1, "pp": 1, "ep": 2, "tokens": str(resized / "tokens.pt"), "cases": cases}))
    run_torchrun(2, WORKER, [str(manifest)])
    for name in MODELS:
        base, big = torch.load(resized / f"{name}_base.pt"), torch.load(resized / f"{name}_big.pt")
        assert big.shape[-1] == 520 and base.abs().max() > 1.0, name
        assert torch.equal(big[..., :500], base), f"{name}: old tokens' logits changed"


@pytest.mark.slow
def test_resized_model_trains_new_rows_and_experts_at_ep2(resized):
    """A CT recipe for a grown vocabulary on a MoE: the appended rows and the experts learn (EP2,
    distributed optimizer), old rows and everything else stay bit-identical."""
    out = resized / "tuned"
    run_trainer(
        2,
        [
            *(f"model.{k}={v}" for k, v in MODELS["mixtral"].items()),
            "model.vocab_size=520",
            "parallel.expert_model_parallel_size=2",
            "parallel.use_distributed_optimizer=true",
            "train.train_iters=2",
            "train.trainable_params=[new_vocab_rows, experts]",
            f"checkpoint.load={resized / 'mixtral_big'}",
            "checkpoint.load_weights_only=true",
            f"checkpoint.save={out}",
        ],
    )
    before, after = read_all(resized / "mixtral_big"), read_all(out)
    for key in before:
        if key in (EMBEDDING, OUTPUT):
            assert after[key][:500].equal(before[key][:500]), key
            assert not after[key][500:520].equal(before[key][500:520]), key
        else:
            assert after[key].equal(before[key]) != key.startswith(EXPERTS), key
