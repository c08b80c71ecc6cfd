import pytest

from megatron_ct.config import ConfigError, load_config, parse_overrides


def test_three_override_spellings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  train_iters: 100\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(
        str(recipe), ["train.train_iters=7", "lr=2e-4", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    )
    assert cfg.train.train_iters == 7
    assert cfg.optim.lr == 2e-4
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.sequence_parallel is True


def test_yaml_values_keep_types():
    assert parse_overrides(["a=1", "b=1e-3", "c=null", "d=[1, 2]", "--e", "true"]) == [
        ("a", 1),
        ("b", 1e-3),
        ("c", None),
        ("d", [1, 2]),
        ("e", True),
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        ("nope=1", "nope: unknown configuration key"),
        ("model.nope=1", "model.nope: unknown key in section 'model'"),
        ("train.train_iters=1.5", "train.train_iters: expected int, got 1.5"),
        ("train.precision=fp8", "train.precision: expected one of bf16, fp16, fp32, got 'fp8'"),
        ("model.num_query_groups=3", "model.num_query_groups: expected a divisor of num_attention_heads=4, got 3"),
        ("train.sequence_parallel=true", "train.sequence_parallel: unknown key in section 'train'"),
        ("checkpoint.save_interval=often", "checkpoint.save_interval: expected int, got 'often'"),
        ("parallel.virtual_pipeline_model_parallel_size=true", "expected int, got True"),
        ("train.trainable_params=3", "train.trainable_params: expected list, got 3"),
        ("train.save_hang_timeout_s=0", "train.save_hang_timeout_s: expected seconds > 0 or null (learned), got 0"),
        ("train.eval_hang_timeout_s=-5", "train.eval_hang_timeout_s: expected seconds > 0 or null (learned), got -5"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"model.hiden_size: unknown key in .*r.yaml"):
        load_config(str(recipe))


def test_missing_file():
    with pytest.raises(ConfigError, match="no/such.yaml: config file not found"):
        load_config("no/such.yaml")


def test_single_string_for_a_list_field():
    assert load_config(None, ["train.trainable_params=embeddings"]).train.trainable_params == ["embeddings"]


def test_llama_ffn_rule():
    # LLaMA-7B: hidden 4096 -> 11008
    assert load_config(None, ["model.hidden_size=4096", "model.num_attention_heads=32"]).model.ffn_hidden_size == 11008
