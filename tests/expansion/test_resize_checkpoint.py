"""Vocabulary expansion on our checkpoints: old rows and function kept; new rows learn alone."""

import json

import pytest
import torch

from megatron_ct.checkpoint.dist_io import DistCheckpointReader
from megatron_ct.expansion.vocab.checkpoint import resize_ct_checkpoint
from megatron_ct.expansion.vocab.resize import VocabResizePlan

from launch import REPO, run_torchrun, run_trainer

pytestmark = pytest.mark.slow
WORKER = REPO / "tests" / "convert" / "logits_worker.py"
EMB, OUT = "embedding.word_embeddings.weight", "output_layer.weight"
# 20 appended tokens; each "is" some old pieces (what the old tokenizer gives for its text).
SOURCES = tuple((i, i + 1, i + 7) for i in range(10, 30))


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    run_trainer(2, ["train.train_iters=3", "--tensor-model-parallel-size", "2", f"checkpoint.save={root / 'base'}"])
    plan = VocabResizePlan(old_vocab_size=500, sources=SOURCES, init="subword_mean", divisible_by=128)
    rows = resize_ct_checkpoint(str(root / "base"), str(root / "big"), plan)
    assert rows == 640  # 520 padded to a multiple of 128
    return root


def read_all(path):
    reader = DistCheckpointReader(str(path))
    return {k: reader.read(k) for k in reader.tensors if not k.startswith("optimizer.")}


def test_old_rows_bit_identical_and_new_rows_are_subword_means(resized):
    base, big = read_all(resized / "base" / "iter_0000003"), read_all(resized / "big" / "iter_0000000")
    for key in base:
        if key in (EMB, OUT):
            assert big[key][:500].equal(base[key][:500]), key
            for j, src in enumerate(SOURCES):
                assert torch.allclose(big[key][500 + j], base[key][list(src)].double().mean(0).float()), (key, j)
        else:
            assert big[key].equal(base[key]), key


def test_logits_over_old_ids_unchanged(resized):
    root = resized
    tokens = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, root / "tokens.pt")
    out = {}
    for name, ckpt in (("base", root / "base"), ("big", root / "big")):
        manifest = root / f"{name}.json"
        cases = [{"ckpt": str(ckpt), "out": str(root / f"{name}.pt")}]
        manifest.write_text(json.dumps({"tp": 2, "pp": 1, "tokens": str(root / "tokens.pt"), "cases": cases}))
        run_torchrun(2, WORKER, [str(manifest)])
        out[name] = torch.load(root / f"{name}.pt")
    assert out["big"].shape[-1] == 520
    assert torch.equal(out["big"][..., :500], out["base"])


def test_only_new_rows_learn(resized):
    root = resized
    run_trainer(
        2,
        [
            "model.vocab_size=520",
            "--tensor-model-parallel-size",
            "2",
            "train.train_iters=3",
            "train.trainable_params=new_vocab_rows",
            f"checkpoint.load={root / 'big'}",
            "checkpoint.load_weights_only=true",
            f"checkpoint.save={root / 'tuned'}",
        ],
    )
    before, after = read_all(root / "big" / "iter_0000000"), read_all(root / "tuned" / "iter_0000003")
    for key in before:
        if key in (EMB, OUT):
            assert after[key][:500].equal(before[key][:500]), key
            assert not after[key][500:520].equal(before[key][500:520]), key
        else:
            assert after[key].equal(before[key]), key
