"""A converted base model continues training in pretrain_ct.py, and what it saves converts back.

The vocabulary (250) pads to 256 at TP2: the trainer masks the padding logits, so its loss
is HF's softmax over the true vocabulary.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from convert_helpers import build_hf_model, build_tokenizer, read_json, run_torchrun

from megatron_ct.checkpoint.dist_io import DistCheckpointReader
from megatron_ct.convert.ct_to_hf import convert_ct_to_hf
from megatron_ct.convert.hf_to_ct import convert_hf_to_ct
from megatron_ct.data.synthetic import SyntheticMarkovDataset

from launch import REPO, losses

pytestmark = pytest.mark.slow
VOCAB, SEQ, GLOBAL_BATCH, SEED, BRANCHING = 250, 32, 4, 1234, 4
TRAIN = [
    "parallel.device=cpu",
    "checkpoint.load_weights_only=true",
    "train.precision=fp32",
    f"train.global_batch_size={GLOBAL_BATCH}",
    "train.micro_batch_size=2",
    f"data.seq_length={SEQ}",
    f"train.seed={SEED}",
    f"data.synthetic_branching={BRANCHING}",
    "optim.lr=1e-3",
    "optim.lr_decay_style=constant",
]


def step_batch(step: int) -> torch.Tensor:
    """The trainer's global batch of ``step`` (synthetic data): ``[G, seq + 1]`` tokens."""
    ds = SyntheticMarkovDataset(VOCAB, SEQ, BRANCHING, SEED)
    return torch.from_numpy(np.stack([ds[i] for i in range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)]))


def hf_loss(model, batch: torch.Tensor) -> float:
    """Token-mean cross-entropy over the whole batch, as the trainer reports it."""
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("continue")
    (root / "hf").mkdir()
    model = build_hf_model("llama", {"vocab_size": VOCAB, "num_key_value_heads": 2}, root / "hf", seed=3)
    build_tokenizer(root / "hf", VOCAB)
    convert_hf_to_ct(str(root / "hf"), str(root / "ct"), target_tp=2, progress=False)
    return root, model


def test_first_loss_equals_hf_and_trained_checkpoint_converts_back(base, tmp_path):
    from transformers import AutoModelForCausalLM

    root, model = base
    ct, save = root / "ct", tmp_path / "run"
    run_torchrun(
        2,
        REPO / "pretrain_ct.py",
        [
            "--config",
            str(ct / "model.yaml"),
            f"checkpoint.load={ct}",
            *TRAIN,
            "train.train_iters=2",
            "--tensor-model-parallel-size",
            "2",
            f"checkpoint.save={save}",
            "checkpoint.save_interval=1",
        ],
    )
    logged = losses(save)
    assert logged[1] == pytest.approx(hf_loss(model, step_batch(0)), rel=1e-5)

    # The TP2-sharded checkpoint of iteration 1 (with optimizer state) back to HF: training
    # kept the converter's record of the base model, so its config keys and tokenizer come
    # back without naming the base; its loss on step 1's batch is the trainer's iteration-2 loss.
    convert_ct_to_hf(str(save / "iter_0000001"), str(tmp_path / "hf_after"), progress=False)
    assert read_json(tmp_path / "hf_after" / "config.json") == read_json(root / "hf" / "config.json")
    assert (tmp_path / "hf_after" / "tokenizer.json").read_bytes() == (root / "hf" / "tokenizer.json").read_bytes()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_after", local_files_only=True)
    assert type(trained).__name__ == "LlamaForCausalLM"
    assert hf_loss(trained, step_batch(1)) == pytest.approx(logged[2], rel=1e-5)
    assert hf_loss(model, step_batch(1)) != pytest.approx(logged[2], rel=1e-4)  # the step changed the weights

    # With the base model named, its config.json keys and tokenizer come back too.
    convert_ct_to_hf(str(save), str(tmp_path / "hf_based"), hf_base=str(root / "hf"), progress=False)
    assert read_json(tmp_path / "hf_based" / "config.json") == read_json(root / "hf" / "config.json")
    assert (tmp_path / "hf_based" / "tokenizer.json").read_bytes() == (root / "hf" / "tokenizer.json").read_bytes()


def test_bf16_first_step_keeps_the_converted_weights(base, tmp_path):
    """bf16 training keeps FP32 main copies of the weights; they must be the converted ones
    (the optimizer is built before the weights-only load, which has to refresh them)."""
    root, _ = base
    ct, save = root / "ct", tmp_path / "run"
    run_torchrun(
        1,
        REPO / "pretrain_ct.py",
        [
            "--config",
            str(ct / "model.yaml"),
            f"checkpoint.load={ct}",
            *TRAIN,
            "train.precision=bf16",
            "train.train_iters=1",
            "optim.lr=1e-7",
            "optim.min_lr=0",
            f"checkpoint.save={save}",
        ],
    )
    before = DistCheckpointReader(str(ct / "iter_0000000")).read("decoder.layers.mlp.linear_fc2.weight")
    after = DistCheckpointReader(str(save / "iter_0000001")).read("decoder.layers.mlp.linear_fc2.weight")
    # lr 1e-7: one step moves weights by ~1e-7, far below bf16 resolution at this scale.
    assert (after.float() - before.bfloat16().float()).abs().max() < 1e-2


def test_resuming_from_a_converted_checkpoint_asks_for_weights_only(base):
    root, _ = base
    ct = root / "ct"
    args = ["--config", str(ct / "model.yaml"), f"checkpoint.load={ct}", *TRAIN, "checkpoint.load_weights_only=false"]
    proc = run_torchrun(1, REPO / "pretrain_ct.py", args, check=False)
    assert proc.returncode != 0
    line = next(li for li in proc.stderr.splitlines() if "pretrain_ct.py: error:" in li)
    assert "checkpoint.load_weights_only: expected true" in line and "holds weights only" in line
