"""A curriculum whose second stage runs at twice the length with a new RoPE theta, through the
real trainer: exact resume at the boundary and inside the long stage, the RoPE switched on
resume, the checkpoint record and the HF export carrying the stage's RoPE."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from launch import losses, read_metrics, run_trainer

pytestmark = pytest.mark.slow


def stages_args(root) -> list[str]:
    """2 steps at 32 tokens, then 2 at 64 with theta 1e6 (and room for 128 positions)."""
    data = {}
    for seed, name in enumerate(("a", "b")):
        prefix = str(root / f"{name}_text_document")
        data[name] = prefix
        if os.path.exists(prefix + ".idx"):
            continue
        from megatron_ct.preprocess.writer import IndexedDatasetWriter

        rng = np.random.default_rng(seed)
        docs = [rng.integers(0, 500, rng.integers(1, 90)) for _ in range(120)]
        with IndexedDatasetWriter({"t": prefix}, np.uint16) as w:
            w.add_documents("t", np.concatenate(docs).astype(np.uint16), np.array([len(d) for d in docs]))
            w.commit()
    blend = "{a: 0.5, b: 0.5}"
    return [
        f"data.datasets={{a: {data['a']}, b: {data['b']}}}",
        f"data.stages=[{{name: short, iters: 2, blend: {blend}}}, {{name: long, blend: {blend}, seq_length: 64, "
        "rotary_base: 1.0e6, max_position_embeddings: 128}]",
        f"data.index_cache_dir={root / 'cache'}",
        "train.train_iters=4",
    ]


def test_resume_at_and_after_a_length_and_rope_change_gives_the_uninterrupted_run(tmp_path):
    args = stages_args(tmp_path)
    ck = tmp_path / "ck"
    run_trainer(2, args + [f"logging.log_dir={tmp_path / 'straight'}"])
    # The first job chunk: a checkpoint at the boundary (2) and one inside the long stage (3).
    run_trainer(2, args + ["train.exit_interval=3", "checkpoint.save_interval=2", f"checkpoint.save={ck}"])
    resumed = {}
    for it in (2, 3):
        out = tmp_path / f"from{it}"
        proc = run_trainer(2, args + [f"checkpoint.load={ck / f'iter_{it:07d}'}", f"logging.log_dir={out}"])
        resumed[it] = losses(out)
        assert "RoPE theta 1e+06" in proc.stderr  # the long stage's RoPE, put into the resumed model
    straight = losses(tmp_path / "straight")
    assert sorted(straight) == [1, 2, 3, 4]
    assert resumed[2] == {i: straight[i] for i in (3, 4)} and resumed[3] == {4: straight[4]}
    assert [r["stage"] for r in read_metrics(tmp_path / "straight")] == ["short"] * 2 + ["long"] * 2
    # Tokens per step follow the stage's length (8 sequences of 32, then of 64).
    tokens = [r["tokens_per_s"] * r["step_time_s"] for r in read_metrics(tmp_path / "straight")]
    assert tokens == pytest.approx([256, 256, 512, 512], rel=1e-6)

    # The record of each checkpoint: the model as trained up to it (its RoPE), which the export writes.
    from megatron_ct.checkpoint.meta import read_meta
    from megatron_ct.convert.ct_to_hf import convert_ct_to_hf

    assert read_meta(str(ck / "iter_0000002")).model["rotary_base"] == 10000.0
    convert_ct_to_hf(str(ck / "iter_0000003"), str(tmp_path / "hf"), progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["rope_theta"], config["rope_scaling"], config["max_position_embeddings"]) == (1e6, None, 128)
