"""Bad input to tools/convert_checkpoint.py: exit 2, one line naming the file/tensor/key and what was expected."""

import importlib.util
import json
import shutil

import pytest

from launch import REPO

_spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def run_cli(capsys, *args) -> str:
    rc = cli.main([*args, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"expected exit 2, got {rc}: {err}"
    assert len(err.splitlines()) == 1 and err.startswith("convert_checkpoint.py: error: "), err
    return err


@pytest.fixture
def hf_copy(converted, tmp_path):
    """A writable copy of a converted case's HF directory (untied LLaMA, safetensors)."""
    dst = tmp_path / "hf"
    shutil.copytree(converted["llama_untied_mha"].hf_dir, dst)
    return dst


def edit_config(hf_dir, **changes):
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def to_ct(capsys, hf_dir, tmp_path, *extra) -> str:
    return run_cli(capsys, "hf-to-ct", "--input", str(hf_dir), "--output", str(tmp_path / "ct"), *extra)


def test_unknown_architecture_lists_supported(capsys, hf_copy, tmp_path):
    edit_config(hf_copy, architectures=["GPTNeoXForCausalLM"])
    err = to_ct(capsys, hf_copy, tmp_path)
    assert "GPTNeoXForCausalLM" in err and "config.json" in err
    assert all(a in err for a in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"))


def test_missing_files(capsys, hf_copy, tmp_path):
    assert "no such directory" in to_ct(capsys, tmp_path / "nowhere", tmp_path)
    (hf_copy / "config.json").rename(tmp_path / "config.json")
    assert "config.json: missing" in to_ct(capsys, hf_copy, tmp_path)
    (tmp_path / "config.json").rename(hf_copy / "config.json")
    (hf_copy / "model.safetensors").unlink()
    assert "no weights found" in to_ct(capsys, hf_copy, tmp_path)


def test_index_naming_a_missing_shard(capsys, converted, tmp_path):
    hf = tmp_path / "sharded"
    shutil.copytree(converted["llama_tied_gqa_llama3"].hf_dir, hf)
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.unlink()
    err = to_ct(capsys, hf, tmp_path)
    assert "model.safetensors.index.json" in err and shard.name in err and "missing" in err


def test_shape_mismatch_names_tensor_and_both_shapes(capsys, hf_copy, tmp_path):
    edit_config(hf_copy, intermediate_size=96)
    err = to_ct(capsys, hf_copy, tmp_path)
    assert "model.layers.0.mlp.gate_proj.weight" in err and "(128, 64)" in err and "(96, 64)" in err


def test_vocab_in_config_disagreeing_with_embedding(capsys, hf_copy, tmp_path):
    edit_config(hf_copy, vocab_size=320)
    err = to_ct(capsys, hf_copy, tmp_path)
    assert "model.embed_tokens.weight has 300 rows" in err and "vocab_size is 320" in err


def test_bad_rope_scaling_and_layout(capsys, hf_copy, tmp_path):
    rope = json.loads((hf_copy / "config.json").read_text())["rope_parameters"]  # transformers 5 style
    edit_config(hf_copy, rope_parameters={**rope, "rope_type": "longrope"})
    err = to_ct(capsys, hf_copy, tmp_path)
    assert "rope_parameters" in err and "longrope" in err
    edit_config(hf_copy, rope_parameters=None, rope_scaling={"type": "yarn", "factor": 2.0, "beta": 1})
    assert "rope_scaling.beta is not a known RoPE scaling key" in to_ct(capsys, hf_copy, tmp_path)
    edit_config(hf_copy, rope_scaling=None)
    err = to_ct(capsys, hf_copy, tmp_path, "--target-tp", "3")
    assert "--target-tp: expected one of 1, 2, 4 (a divisor of num_attention_heads=4" in err
    assert not (tmp_path / "ct").exists()  # nothing written on bad input


def test_tp_that_does_not_divide_the_heads_lists_the_valid_sizes(capsys, tmp_path):
    """SmolLM2-135M's shape: 9 query heads, 3 key/value heads (valid TP: 1 and 3)."""
    from convert_helpers import build_hf_model

    hf = tmp_path / "smol"
    hf.mkdir()
    shape = {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 192}
    build_hf_model("llama", {"vocab_size": 300, "tie_word_embeddings": True, **shape}, hf)
    capsys.readouterr()  # transformers' save progress
    err = to_ct(capsys, hf, tmp_path, "--target-tp", "2")
    assert err == (
        "convert_checkpoint.py: error: --target-tp: expected one of 1, 3 (a divisor of num_attention_heads=9, "
        "num_query_groups=3 and ffn_hidden_size=192), got 2"
    )
    assert cli.main(["hf-to-ct", "--input", str(hf), "--output", str(tmp_path / "ct"), "--target-tp", "3",
                     "--no-progress"]) == 0  # fmt: skip


def test_qwen3_head_dim_and_qk_norm_are_checked(capsys, converted, tmp_path):
    hf = tmp_path / "qwen3"
    shutil.copytree(converted["qwen3_0_6b_shaped"].hf_dir, hf)
    edit_config(hf, head_dim=16)  # the weights are for 32
    err = to_ct(capsys, hf, tmp_path)
    assert "self_attn.q_proj.weight has shape (128, 64), expected (64, 64)" in err
    edit_config(hf, head_dim=32, architectures=["LlamaForCausalLM"])
    err = to_ct(capsys, hf, tmp_path)
    assert "unexpected tensor model.layers.0.self_attn.k_norm.weight for LlamaForCausalLM" in err
    ct = converted["qwen3_0_6b_shaped"].ct_dir
    err = run_cli(
        capsys, "ct-to-hf", "--input", str(ct), "--output", str(tmp_path / "o"), "--architecture", "LlamaForCausalLM"
    )
    assert "architecture 'LlamaForCausalLM' does not fit model.family=qwen3; expected Qwen3ForCausalLM" in err


def test_ct_to_hf_errors(capsys, converted, tmp_path):
    ct = converted["qwen2_bias_tied"].ct_dir
    err = run_cli(capsys, "ct-to-hf", "--input", str(tmp_path), "--output", str(tmp_path / "o"))
    assert str(tmp_path) in err and "latest_checkpointed_iteration.txt" in err
    err = run_cli(
        capsys, "ct-to-hf", "--input", str(ct), "--output", str(tmp_path / "o"), "--architecture", "LlamaForCausalLM"
    )
    assert "does not fit model.family=qwen2; expected Qwen2ForCausalLM" in err
    (tmp_path / "o").mkdir()
    err = run_cli(capsys, "ct-to-hf", "--input", str(ct), "--output", str(tmp_path / "o"))
    assert "already exists" in err and "--overwrite" in err


def test_mistral_sliding_window_shorter_than_context_is_a_warning(capsys, converted, tmp_path):
    hf = tmp_path / "mistral"
    shutil.copytree(converted["mistral"].hf_dir, hf)
    edit_config(hf, sliding_window=16)
    assert cli.main(["hf-to-ct", "--input", str(hf), "--output", str(tmp_path / "ct"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "sliding_window=16" in err and "at most 16 tokens" in err


def test_unknown_dtype_either_direction(tmp_path):
    from megatron_ct.convert.ct_to_hf import convert_ct_to_hf
    from megatron_ct.convert.hf_to_ct import convert_hf_to_ct
    from megatron_ct.errors import ConversionError

    for convert in (convert_hf_to_ct, convert_ct_to_hf):
        with pytest.raises(ConversionError, match="--dtype fp8: expected one of auto, fp32, bf16, fp16"):
            convert(str(tmp_path / "in"), str(tmp_path / "out"), dtype="fp8", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written
