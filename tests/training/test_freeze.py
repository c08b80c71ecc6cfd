"""Partial training: frozen parameters stay bit-identical, the chosen ones learn."""

import pytest
from tiny_checkpoint import write_random_checkpoint

from megatron_ct.checkpoint.dist_io import DistCheckpointReader
from megatron_ct.training.freeze import expand_patterns

from launch import run_trainer

pytestmark = pytest.mark.slow


def tensors(path):
    reader = DistCheckpointReader(str(path))
    return {k: reader.read(k) for k in reader.tensors if not k.startswith("optimizer")}


@pytest.mark.parametrize(
    "nproc, flags, trainable, expect_changed",
    [
        # Vocabulary expansion's first stage: only embeddings and output layer learn (TP2: sharded rows).
        (
            2,
            ["--tensor-model-parallel-size", "2"],
            "embeddings",
            {"embedding.word_embeddings.weight", "output_layer.weight"},
        ),
        # LLaMA-Pro: only some blocks learn (PP2: global layer numbers across stages).
        (2, ["--pipeline-model-parallel-size", "2"], "layers:1,3", "layers"),
    ],
    ids=["embeddings-TP2", "layers-PP2"],
)
def test_frozen_parameters_stay_bit_identical(tmp_path, nproc, flags, trainable, expect_changed):
    write_random_checkpoint(tmp_path / "init", seed=0)  # weights-only, as a converted model
    run_trainer(
        nproc,
        flags
        + [
            "train.train_iters=3",
            f"train.trainable_params={trainable}",
            f"checkpoint.load={tmp_path / 'init'}",
            "checkpoint.load_weights_only=true",
            f"checkpoint.save={tmp_path / 'after'}",
        ],
    )
    before = tensors(tmp_path / "init" / "iter_0000000")
    after = tensors(tmp_path / "after" / "iter_0000003")
    changed = {k for k in before if not before[k].equal(after[k])}
    if expect_changed == "layers":
        # Layers are stacked in the checkpoint: [L, ...]; only rows 1 and 3 may differ.
        for k in before:
            if k.startswith("decoder.layers."):
                diff = [i for i in range(before[k].shape[0]) if not before[k][i].equal(after[k][i])]
                assert diff == [1, 3] or (diff == [] and "norm" in k), (k, diff)
        assert {k for k in changed if not k.startswith("decoder.layers.")} == set()
    else:
        assert changed == expect_changed
        # Resuming it with everything trainable: the saved optimizer state holds only the
        # embeddings' groups. One line naming the changed key, on every rank that prints.
        proc = run_trainer(
            nproc,
            flags + ["train.train_iters=4", f"checkpoint.load={tmp_path / 'after'}"],
            check=False,
            timeout=120,
        )
        errors = [li for li in proc.stderr.splitlines() if "pretrain_ct.py: error:" in li]
        assert proc.returncode != 0 and errors, proc.stderr[-2000:]
        assert all(e.endswith("or start from its weights with checkpoint.load_weights_only=true") for e in errors)
        assert all("error: train.trainable_params: expected ['embeddings'] as when " in e for e in errors)
        assert "KeyError" not in proc.stderr and "CheckpointException" not in proc.stderr, proc.stderr[-2000:]


def test_bad_pattern_is_a_config_error_on_every_rank(tmp_path):
    proc = run_trainer(2, ["train.train_iters=1", "train.trainable_params=[decoder.lyers.*]"], check=False, timeout=120)
    errors = [li for li in proc.stderr.splitlines() if "pretrain_ct.py: error:" in li]
    # Raised on every rank after one all-reduce; the launcher may stop one rank before it prints.
    assert errors and all("['decoder.lyers.*'] match no parameter" in e for e in errors), proc.stderr[-2000:]


def test_aliases():
    assert expand_patterns(["embeddings", "layers:2,5"], None) == [
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        "decoder.layers.2.*",
        "decoder.layers.5.*",
    ]
    assert expand_patterns(["new_blocks"], [4, 9]) == ["decoder.layers.4.*", "decoder.layers.9.*"]
