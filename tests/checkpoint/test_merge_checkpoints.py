"""Checkpoint merging (tools/merge_checkpoints.py): exact end points, averaging, expanded
vocabularies, refusals, Hugging Face output, and merges of TP2xPP2 saves."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tiny_checkpoint import read_all, write_like, write_random_checkpoint

from megatron_ct.checkpoint import merge as merge_mod
from megatron_ct.checkpoint.keys import EMBEDDING, OUTPUT
from megatron_ct.checkpoint.merge import merge_checkpoints, open_merge
from megatron_ct.checkpoint.meta import read_meta
from megatron_ct.errors import ConversionError

from launch import REPO

sys.path.insert(0, str(REPO / "tools"))
import merge_checkpoints as cli  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return write_random_checkpoint(root / "base", seed=1), write_random_checkpoint(root / "ct", seed=2)


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alpha_end_points_are_the_inputs_bit_for_bit(tmp_path, dtype):
    base = write_random_checkpoint(tmp_path / "base", seed=1, dtype=dtype)
    ct = write_random_checkpoint(tmp_path / "ct", seed=2, dtype=dtype)
    merge_checkpoints([base, ct], [1.0, 0.0], str(tmp_path / "a0"), progress=False)
    merge_checkpoints([base, ct], [0.0, 1.0], str(tmp_path / "a1"), progress=False)
    assert equal(read_all(tmp_path / "a0"), read_all(base))
    assert equal(read_all(tmp_path / "a1"), read_all(ct))


def test_average_of_copies_is_the_checkpoint(tmp_path, pair):
    base, _ = pair
    merge_checkpoints([base] * 3, None, str(tmp_path / "avg"), progress=False)
    assert equal(read_all(tmp_path / "avg"), read_all(base))


def test_interpolation_values_and_block_streaming(tmp_path, pair, monkeypatch):
    base, ct = pair
    merge_checkpoints([base, ct], [0.7, 0.3], str(tmp_path / "m"), progress=False)
    a, b, m = read_all(base), read_all(ct), read_all(tmp_path / "m")
    for k in a:
        assert torch.allclose(m[k], 0.7 * a[k] + 0.3 * b[k], rtol=1e-6, atol=1e-7), k
        assert not m[k].equal(a[k]) and not m[k].equal(b[k]), k
    # Small blocks: every tensor is read, summed and written in many pieces; same result.
    monkeypatch.setattr(merge_mod, "BLOCK_ELEMENTS", 1000)
    merge_checkpoints([base, ct], [0.7, 0.3], str(tmp_path / "blocks"), progress=False)
    assert equal(read_all(tmp_path / "blocks"), m)


def test_expanded_vocabulary_old_rows_interpolate_new_rows_from_ct(tmp_path, pair):
    from megatron_ct.expansion.vocab.checkpoint import resize_ct_checkpoint
    from megatron_ct.expansion.vocab.resize import VocabResizePlan

    base, _ = pair
    grown = tmp_path / "grown"
    plan = VocabResizePlan(old_vocab_size=500, sources=tuple((i, i + 1) for i in range(20)), init="subword_mean")
    resize_ct_checkpoint(base, str(grown), plan)  # 520 tokens, 640 rows, records vocab_expansion
    ct = write_like(grown, tmp_path / "ct", seed=3)  # "trained" CT: every row different
    b, c = read_all(base), read_all(ct)
    for alpha in (0.0, 0.4):
        out = tmp_path / f"a{alpha}"
        merge_checkpoints([base, ct], [1 - alpha, alpha], str(out), progress=False)
        m = read_all(out)
        for k in (EMBEDDING, OUTPUT):
            assert m[k].shape == (640, 64)
            old = b[k][:500] if alpha == 0 else (1 - alpha) * b[k][:500] + alpha * c[k][:500]
            assert torch.allclose(m[k][:500], old, rtol=1e-6, atol=1e-7), k
            assert m[k][500:].equal(c[k][500:]), k  # appended tokens and padding: the CT side
        if alpha == 0:
            assert m[EMBEDDING][:500].equal(b[EMBEDDING][:500])
        meta = read_meta(str(out / "iter_0000000"))
        assert (meta.true_vocab_size, meta.padded_vocab_size) == (520, 640)
        assert meta.vocab_expansion["old_vocab_size"] == 500 and meta.weights_only


def run_cli(args, capsys):
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


def test_a_shorter_position_table_does_not_block_a_merge(tmp_path, pair):
    """A CT run trained with a shorter max_position_embeddings than its base (the quickstart's
    2048 against SmolLM2's 8192) stores the same tensors: base and result still merge."""
    base, _ = pair
    short = write_random_checkpoint(tmp_path / "short", seed=2, max_position_embeddings=1024)
    merge_checkpoints([base, short], [0.5, 0.5], str(tmp_path / "mid"), progress=False)
    a, b, mid = read_all(base), read_all(short), read_all(tmp_path / "mid")
    for k in a:
        torch.testing.assert_close(mid[k].double(), 0.5 * a[k].double() + 0.5 * b[k].double())


def test_refusals_are_one_line_exit_2(tmp_path, pair, capsys):
    base, ct = pair
    deep = write_random_checkpoint(tmp_path / "deep", seed=4, num_layers=6)
    wide = write_random_checkpoint(tmp_path / "wide", seed=5, vocab_size=600)
    out = tmp_path / "out"
    cases = [
        (["--inputs", base, deep], "model.num_layers=6 but"),
        (["--inputs", base, ct, "--weights", "0.5"], "--weights: expected 2 weights, one per input, got 1"),
        (["--inputs", base, ct, "--weights", "1", "1"], "expected weights adding up to 1"),
        (["--inputs", base, wide], "records no vocabulary expansion from 500"),
        (["--inputs", base, tmp_path / "missing"], "does not exist"),
    ]
    for args, message in cases:
        rc, err = run_cli([*args, "--output", out, "--no-progress"], capsys)
        assert rc == 2, args
        assert err.startswith("merge_checkpoints.py: error: ") and message in err, err
        assert len(err.splitlines()) == 1 and not out.exists()
    before = read_all(base)
    rc, err = run_cli(["--inputs", base, ct, "--output", base, "--overwrite", "--no-progress"], capsys)
    assert rc == 2 and "holds input" in err
    assert equal(read_all(base), before)  # the input was not replaced


def test_hf_output_equals_merge_then_convert(tmp_path, pair, capsys):
    from safetensors.torch import load_file

    from megatron_ct.convert.ct_to_hf import convert_ct_to_hf

    base, ct = pair
    rc, _ = run_cli(
        ["--inputs", base, ct, "--weights", "0.25", "0.75", "--output", tmp_path / "hf", "--hf", "--no-progress"],
        capsys,
    )
    assert rc == 0
    merge_checkpoints([base, ct], [0.25, 0.75], str(tmp_path / "ours"), progress=False)
    convert_ct_to_hf(str(tmp_path / "ours"), str(tmp_path / "converted"), progress=False)
    direct, converted = (
        {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
        for d in (tmp_path / "hf", tmp_path / "converted")
    )
    assert direct.keys() == converted.keys() and len(direct) == 2 + 4 * 9 + 1
    assert all(direct[k].equal(converted[k]) for k in direct)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads(
        (tmp_path / "converted" / "config.json").read_text()
    )


def test_open_merge_rejects_bad_weights():
    with pytest.raises(ConversionError, match="expected finite numbers"):
        open_merge(["a", "b"], [float("nan"), 1.0])


# --- through the trainer: TP2xPP2 saves, and the merged model trains -------------------


@pytest.mark.slow
def test_merge_of_tp2pp2_save_equals_merge_at_tp1_and_trains(tmp_path):
    from launch import read_metrics, run_trainer

    big = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    run_trainer(4, big + ["train.train_iters=0", "train.seed=7", f"checkpoint.save={tmp_path / 'tp2pp2'}"])
    # The same weights re-saved by a TP1 run (megatron-core reshards on load).
    run_trainer(
        1,
        [
            "train.train_iters=0",
            f"checkpoint.load={tmp_path / 'tp2pp2'}",
            "checkpoint.load_weights_only=true",
            f"checkpoint.save={tmp_path / 'tp1'}",
        ],
    )
    assert equal(read_all(tmp_path / "tp2pp2"), read_all(tmp_path / "tp1"))
    ct = write_like(tmp_path / "tp1", tmp_path / "ct", seed=9)
    for name in ("tp2pp2", "tp1"):
        merge_checkpoints([str(tmp_path / name), ct], [0.6, 0.4], str(tmp_path / f"m_{name}"), progress=False)
    merged = read_all(tmp_path / "m_tp1")
    assert equal(read_all(tmp_path / "m_tp2pp2"), merged)
    assert not equal(merged, read_all(tmp_path / "tp1"))

    run_trainer(
        1,
        [
            "train.train_iters=1",
            f"checkpoint.load={tmp_path / 'm_tp2pp2'}",
            "checkpoint.load_weights_only=true",
            f"logging.log_dir={tmp_path / 'train'}",
        ],
    )
    (record,) = read_metrics(tmp_path / "train")
    assert record["iteration"] == 1 and record["applied"] and 0 < record["loss"] < 20


@pytest.mark.parametrize("hf", [False, True])
def test_inputs_are_read_a_bounded_block_at_a_time(tmp_path, pair, monkeypatch, hf):
    """Memory stays bounded by the block size, whatever the model size: no input read covers
    more than BLOCK_ELEMENTS elements or more than one layer of a stacked tensor."""
    from megatron_ct.checkpoint.dist_io import DistCheckpointReader

    base, ct = pair
    reads = []
    original = DistCheckpointReader.read

    def recording(self, key, offsets=None, sizes=None):
        out = original(self, key, offsets, sizes)
        reads.append((key, tuple(out.shape)))
        return out

    monkeypatch.setattr(DistCheckpointReader, "read", recording)
    monkeypatch.setattr(merge_mod, "BLOCK_ELEMENTS", 2048)
    merge_checkpoints([base, ct], [0.5, 0.5], str(tmp_path / "out"), hf=hf, progress=False)
    assert len(reads) > 2 * 9
    assert max(torch.Size(s).numel() for _, s in reads) <= 2048
    assert all(s[0] == 1 for k, s in reads if k.startswith("decoder.layers.") and len(s) > 1)
