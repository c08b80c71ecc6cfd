"""HF -> ours -> HF: every tensor bit-identical, config.json equal, tokenizer files intact."""

import filecmp
import json

import pytest
import torch
from convert_helpers import CASES, build_hf_model, build_tokenizer, safetensors_dict

from megatron_ct.checkpoint.dist_io import DistCheckpointReader
from megatron_ct.convert.ct_to_hf import convert_ct_to_hf
from megatron_ct.convert.hf_files import HFWeights
from megatron_ct.convert.hf_to_ct import convert_hf_to_ct


def assert_same_model_dir(original, round_trip):
    theirs = {n: HFWeights(str(original)).load(n) for n in HFWeights(str(original)).names()}
    ours = safetensors_dict(round_trip)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), f"{name} differs after the round trip"
    assert json.loads((round_trip / "config.json").read_text()) == json.loads((original / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(original / name, round_trip / name, shallow=False), name


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_identical(converted, tmp_path, name):
    case = converted[name]
    out = tmp_path / "hf"
    report = convert_ct_to_hf(str(case.ct_dir), str(out), max_shard_size="60KB", progress=False)
    assert report.warnings == []
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded, with an index
    assert_same_model_dir(case.hf_dir, out)


def test_bf16_round_trip_and_transformers_loads_it_offline(tmp_path, tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_type, kwargs, _ = CASES["qwen2_bias_tied"]
    src = tmp_path / "src"
    src.mkdir()
    build_hf_model(model_type, kwargs, src).to(torch.bfloat16).save_pretrained(src)
    build_tokenizer(src, kwargs["vocab_size"])
    convert_hf_to_ct(str(src), str(tmp_path / "ct"), target_tp=1, target_pp=2, progress=False)
    convert_ct_to_hf(str(tmp_path / "ct"), str(tmp_path / "back"), progress=False)
    assert_same_model_dir(src, tmp_path / "back")
    a = AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True)
    assert b.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)
    text = "w5 w17 unknown w299"
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "back", local_files_only=True)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(src, local_files_only=True)(text)["input_ids"]
    )


def test_dtype_options_cast_both_ways(converted, tmp_path):
    case = converted["llama_untied_mha"]
    convert_hf_to_ct(str(case.hf_dir), str(tmp_path / "ct"), dtype="bf16", progress=False)
    reader = DistCheckpointReader(str(tmp_path / "ct" / "iter_0000000"))
    assert {reader.dtype(k) for k in reader.tensors} == {torch.bfloat16}
    convert_ct_to_hf(str(tmp_path / "ct"), str(tmp_path / "hf"), dtype="fp32", progress=False)
    back = safetensors_dict(tmp_path / "hf")
    original = HFWeights(str(case.hf_dir))
    for name in original.names():
        assert back[name].dtype == torch.float32
        assert torch.equal(back[name], original.load(name).bfloat16().float()), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"
