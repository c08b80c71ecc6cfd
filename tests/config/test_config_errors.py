"""Bad configuration: one line naming the key and the expected value, on every rank, no hang."""

import pytest

from megatron_ct.config import ConfigError, load_config, validate_for_world

from launch import run_trainer


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [
                "--tensor-model-parallel-size",
                "3",
                "model.num_attention_heads=6",
                "model.num_query_groups=6",
                "model.hidden_size=96",
                "model.ffn_hidden_size=192",
            ],
            "expected a divisor of the world size 2, got 3*1=3",
        ),
        (
            ["--tensor-model-parallel-size", "2", "model.num_query_groups=1"],
            "parallel.tensor_model_parallel_size: expected one of 1 (a divisor of num_attention_heads=4, "
            "num_query_groups=1 and ffn_hidden_size=128), got 2",
        ),
        (
            ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
            "expected a divisor of the world size 2, got 2*2=4",
        ),
        (
            ["train.global_batch_size=6", "train.micro_batch_size=2"],
            "train.global_batch_size: expected a multiple of micro_batch_size*data_parallel_size=2*2=4, got 6",
        ),
        (["train.trian_iters=3"], "train.trian_iters: unknown key in section 'train'"),
    ],
    ids=["tp-world", "tp-groups", "tpxpp-world", "global-batch", "unknown-key"],
)
def test_config_error_on_every_rank_without_hanging(overrides, message):
    proc = run_trainer(2, overrides, check=False, timeout=90, torchrun=True)  # the real agent
    assert proc.returncode != 0
    err_lines = [line for line in proc.stderr.splitlines() if "pretrain_ct.py: error:" in line]
    # Every rank raises it before any collective; torchrun may stop the other rank before it
    # prints once one has exited, so one or two lines, and no hang (the timeout above).
    assert 1 <= len(err_lines) <= 2, proc.stderr[-3000:]
    assert all(message in line for line in err_lines), err_lines
    # No Python traceback from our code (torchrun prints its own summary of failed ranks).
    assert "raise ConfigError" not in proc.stderr and "megatron_ct/" not in proc.stderr


def test_tp_must_divide_heads():
    cfg = load_config(
        None, ["model.num_attention_heads=4", "model.num_query_groups=4", "--tensor-model-parallel-size", "8"]
    )
    with pytest.raises(
        ConfigError,
        match=r"tensor_model_parallel_size: expected one of 1, 2, 4 \(a divisor of num_attention_heads=4, .*\), got 8",
    ):
        validate_for_world(cfg, 8)


def test_pipeline_needs_two_microbatches():
    cfg = load_config(
        None, ["--pipeline-model-parallel-size", "2", "train.global_batch_size=2", "train.micro_batch_size=2"]
    )
    with pytest.raises(ConfigError, match=r"train.global_batch_size: pipeline parallelism needs >= 2 micro-batches"):
        validate_for_world(cfg, 2)


def test_layers_must_split_over_stages():
    cfg = load_config(None, ["model.num_layers=3", "--pipeline-model-parallel-size", "2"])
    with pytest.raises(ConfigError, match=r"to divide model.num_layers=3"):
        validate_for_world(cfg, 2)


def test_layout_is_derived():
    cfg = load_config(
        None, ["--tensor-model-parallel-size", "2", "train.global_batch_size=16", "train.micro_batch_size=2"]
    )
    lay = validate_for_world(cfg, 8)
    assert (lay.dims.tp, lay.dims.pp, lay.dims.dp, lay.num_microbatches) == (2, 1, 4, 2)


def test_head_width_fields():
    """Qwen3's explicit head width (kv_channels) and per-head q/k norm."""
    cfg = load_config(None, ["model.hidden_size=64", "model.kv_channels=32", "model.qk_layernorm=true"])
    assert (cfg.model.head_dim, cfg.model.qk_layernorm) == (32, True)
    assert load_config(None, ["model.hidden_size=64"]).model.head_dim == 16  # 4 heads
    with pytest.raises(ConfigError, match=r"^model.kv_channels: expected a positive integer or null, got 0$"):
        load_config(None, ["model.kv_channels=0"])
    with pytest.raises(ConfigError, match=r"model.hidden_size: .*num_attention_heads=4 \(or set model.kv_channels\)"):
        load_config(None, ["model.hidden_size=66"])
    load_config(None, ["model.hidden_size=66", "model.kv_channels=16"])  # heads need not divide the width


def test_dead_expert_intervals():
    assert load_config(None, []).logging.moe_dead_expert_intervals == 5
    assert load_config(None, ["logging.moe_dead_expert_intervals=null"]).logging.moe_dead_expert_intervals is None
    with pytest.raises(
        ConfigError, match=r"^logging.moe_dead_expert_intervals: expected an integer >= 1 \(log intervals\) or null"
    ):
        load_config(None, ["logging.moe_dead_expert_intervals=0"])
