"""The loop as a user sees it: precisions, NaN policy, weights-only starts, metrics files."""

import math

import pytest

from launch import losses, read_metrics, run_trainer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_with_fp32_master_weights(tmp_path, precision):
    run_trainer(
        1,
        [
            f"train.precision={precision}",
            "train.train_iters=8",
            "optim.initial_loss_scale=1024",
            f"logging.log_dir={tmp_path}",
        ],
    )
    got = losses(tmp_path)
    assert all(math.isfinite(v) for v in got.values())
    assert got[8] < got[1] - 0.03, got


def test_fp16_overflow_lowers_loss_scale_and_is_reported(tmp_path):
    proc = run_trainer(
        1,
        ["train.precision=fp16", "train.train_iters=4", "optim.initial_loss_scale=1e30", f"logging.log_dir={tmp_path}"],
    )
    assert "fp16 overflow (loss scale lowered)" in proc.stderr
    records = read_metrics(tmp_path)
    assert records[0]["applied"] is False and records[-1]["skipped_steps"] >= 1


def test_nan_stop_policy_names_the_step(tmp_path):
    # An absurd LR blows the weights up after the first update: step 2 has a NaN gradient norm
    # (RMSNorm keeps the loss itself finite).
    proc = run_trainer(
        1, ["optim.lr=1e30", "train.train_iters=5", "train.nan_policy=stop", f"logging.log_dir={tmp_path}"], check=False
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "iteration 2: non-finite grad norm" in proc.stderr
    assert "stopping (train.nan_policy=stop)" in proc.stderr
    assert sorted(losses(tmp_path)) == [1]  # nothing was logged (or applied) for the bad step


def test_nan_skip_policy_skips_then_gives_up(tmp_path):
    proc = run_trainer(
        1,
        [
            "optim.lr=1e30",
            "train.train_iters=5",
            "train.nan_policy=skip",
            "train.max_skipped_steps=1",
            f"logging.log_dir={tmp_path}",
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "iteration 2: non-finite grad norm" in proc.stderr and "update skipped" in proc.stderr
    assert "2 consecutive steps skipped (train.max_skipped_steps=1)" in proc.stderr
    records = {r["iteration"]: r for r in read_metrics(tmp_path)}
    assert records[1]["applied"] is True and records[2]["applied"] is False


def test_tied_embeddings_and_qkv_bias_match_across_pipeline(tmp_path):
    """Tied embeddings under PP keep two copies (first and last stage) in sync via
    megatron-core's embedding group; Qwen2-style QKV bias rides along."""
    arch = ["model.untie_embeddings_and_output_weights=false", "model.add_qkv_bias=true", "train.train_iters=3"]
    run_trainer(1, arch + ["train.train_iters=0", f"checkpoint.save={tmp_path / 'init'}"])
    start = [f"checkpoint.load={tmp_path / 'init'}", "checkpoint.load_weights_only=true"]
    run_trainer(1, arch + start + [f"logging.log_dir={tmp_path / 'pp1'}"])
    run_trainer(2, arch + start + ["--pipeline-model-parallel-size", "2", f"logging.log_dir={tmp_path / 'pp2'}"])
    ref, got = losses(tmp_path / "pp1"), losses(tmp_path / "pp2")
    for it in (1, 2, 3):
        assert got[it] == pytest.approx(ref[it], rel=1e-4)
    assert ref[3] < ref[1]


def test_weights_only_start_rewarms_and_restarts_iteration(tmp_path):
    base = tmp_path / "base"
    run_trainer(1, ["train.train_iters=6", f"checkpoint.save={base}"])
    ct = [
        "train.train_iters=3",
        "optim.lr=1e-3",
        "optim.lr_warmup_iters=2",
        "optim.lr_warmup_init=1e-5",
        "optim.lr_decay_style=constant",
    ]
    run_trainer(
        1, ct + [f"checkpoint.load={base}", "checkpoint.load_weights_only=true", f"logging.log_dir={tmp_path / 'ct'}"]
    )
    run_trainer(1, ct + [f"logging.log_dir={tmp_path / 'scratch'}"])
    ct_records = read_metrics(tmp_path / "ct")
    assert [r["iteration"] for r in ct_records] == [1, 2, 3]
    assert [r["lr"] for r in ct_records] == pytest.approx([1e-5, 5.05e-4, 1e-3])
    # The base model's weights were used: the first loss is far below a from-scratch start.
    assert ct_records[0]["loss"] < losses(tmp_path / "scratch")[1] - 0.1


def test_bf16_weights_only_start_keeps_the_loaded_weights(tmp_path):
    """The optimizer's FP32 main params must be refreshed from the loaded weights, or the
    first update would write the random initialisation back over them."""
    bf16 = ["train.precision=bf16", "optim.lr=1e-4", "optim.lr_decay_style=constant"]
    base = tmp_path / "base"
    run_trainer(1, bf16 + ["train.train_iters=8", "optim.lr=1e-3", f"checkpoint.save={base}"])
    run_trainer(
        1,
        bf16
        + [
            "train.train_iters=2",
            f"checkpoint.load={base}",
            "checkpoint.load_weights_only=true",
            f"logging.log_dir={tmp_path / 'ct'}",
        ],
    )
    run_trainer(1, bf16 + ["train.train_iters=2", f"logging.log_dir={tmp_path / 'scratch'}"])
    ct, scratch = losses(tmp_path / "ct"), losses(tmp_path / "scratch")
    # Iteration 2 runs on the weights after one small update: still the trained model's level.
    assert ct[2] < scratch[2] - 0.3, (ct, scratch)
    assert abs(ct[2] - ct[1]) < 0.1


def test_metrics_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    proc = run_trainer(
        1,
        [
            "train.train_iters=4",
            "logging.log_interval=2",
            f"logging.log_dir={tmp_path}",
            f"logging.tensorboard_dir={tmp_path / 'tb'}",
            "logging.peak_tflops=1.0",
        ],
    )
    records = read_metrics(tmp_path)
    assert [r["iteration"] for r in records] == [2, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "memory_gib", "eta_s"):
        assert key in records[0], key
    assert records[0]["mfu"] == pytest.approx(records[0]["tflops_per_device"] / 1.0)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    line = next(li for li in proc.stderr.splitlines() if "iter      2/4" in li)
    for part in ("loss", "lr", "grad_norm", "tok/s", "TFLOP/s/dev", "MFU", "mem", "ETA"):
        assert part in line, (part, line)


def test_vocab_padding_does_not_change_the_loss(tmp_path):
    """Vocab 500 pads to 512 at TP1 (divisible by 128) and to 768 at TP2 (by 384 = 3x128):
    padding logits are masked, so the loss is the same and equals the unpadded softmax."""
    init = ["train.train_iters=0", "model.make_vocab_size_divisible_by=128", f"checkpoint.save={tmp_path / 'i'}"]
    run_trainer(1, init)
    start = [f"checkpoint.load={tmp_path / 'i'}", "checkpoint.load_weights_only=true", "train.train_iters=1"]
    run_trainer(1, start + [f"logging.log_dir={tmp_path / 'a'}"])
    run_trainer(
        2,
        start
        + [
            "--tensor-model-parallel-size",
            "2",
            "model.make_vocab_size_divisible_by=384",
            f"logging.log_dir={tmp_path / 'b'}",
        ],
    )
    assert losses(tmp_path / "b")[1] == pytest.approx(losses(tmp_path / "a")[1], rel=1e-6)


def test_activation_recompute_gives_the_same_losses(tmp_path):
    # One seed, one layout: the same initial weights in each run.
    for granularity in ("none", "selective", "full"):
        flags = [] if granularity == "none" else [f"train.recompute_granularity={granularity}"]
        run_trainer(1, ["train.train_iters=2", *flags, f"logging.log_dir={tmp_path / granularity}"])
    plain = losses(tmp_path / "none")
    assert sorted(plain) == [1, 2] and plain[2] != plain[1]
    for granularity in ("selective", "full"):
        assert losses(tmp_path / granularity) == pytest.approx(plain, rel=1e-6), granularity
