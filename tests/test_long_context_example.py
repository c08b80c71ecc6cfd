"""examples/long_context/run.py end to end in its tiny mode: a random tiny LLaMA (window 128 tokens)
through the recipe scaled to it (a length stage at 256 tokens, RoPE theta x4), passkey of the base,
of the RoPE alone and after, the heat map, the summary line; and a user fault is one line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from material import build_byte_level_tokenizer, english_lines, save_tiny_hf_llama

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "long_context" / "run.py"

pytest.importorskip("matplotlib", reason="the heat map needs matplotlib")


def _example():
    spec = importlib.util.spec_from_file_location("long_context_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["long_context_run"] = module  # before it runs: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny LLaMA (window 128) with a byte-level tokenizer, and 12 documents of English."""
    root = tmp_path_factory.mktemp("long_context")
    hf = root / "tiny_hf"
    build_byte_level_tokenizer(hf, fim=False)
    save_tiny_hf_llama(hf, tie_word_embeddings=True, rope_theta=10000.0)
    lines = english_lines(480)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(lines[i : i + 40])}) + "\n" for i in range(0, 480, 40)))
    return hf, docs


@pytest.mark.slow  # 38 s on 2 cores: seven tool processes, each importing torch and megatron-core
def test_tiny_run_end_to_end(tiny, tmp_path):
    hf, docs = tiny
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--base", str(hf), "--text", str(docs), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in range(1, 9):
        assert f"[{step}/8]" in proc.stdout
    # long steps show their progress: the trainer's step line (ETA) and eval_long's bar (tokens/s)
    assert "ETA" in proc.stdout and "tok/s" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    # the recipe scaled to the tiny base: its window 128 -> a 256-token stage, RoPE theta 4x its own
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    stage = cfg["data"]["stages"][-1]
    assert stage["seq_length"] == stage["max_position_embeddings"] == 256
    assert stage["rotary_base"] == 40000.0 and cfg["model"]["rotary_base"] == 10000.0
    assert cfg["data"]["datasets"]["books"]["upsample_long"] == {"min_tokens": 256, "factor": 4}
    assert "documents >= 256 tokens x4" in (out / "logs" / "train.log").read_text()
    metrics = [json.loads(li) for li in (out / "ckpt_long" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2] and all(m["tokens_per_s"] > 0 for m in metrics)
    # the trained checkpoint carries the stage's RoPE (what eval_long and an export read)
    from megatron_ct.checkpoint.meta import read_meta
    from megatron_ct.checkpoint.root import resolve_load_dir

    meta = read_meta(resolve_load_dir(str(out / "ckpt_long"))[0])
    model = meta.config["model"]
    assert model["rotary_base"] == 40000.0 and model["max_position_embeddings"] == 256
    # the RoPE alone: the recipe at 0 steps saved the base's weights with the stage's RoPE
    rope = read_meta(resolve_load_dir(str(out / "ckpt_rope"))[0])
    assert rope.iteration == 0 and rope.config["model"]["rotary_base"] == 40000.0
    # passkey of base, RoPE alone and after at the window and the new length, one heat map of all
    records = [json.loads(li) for li in (out / "passkey.jsonl").read_text().splitlines()]
    labels = ("base", "rope_only", "after")
    assert {(r["label"], r["length"]) for r in records} == {(lb, n) for lb in labels for n in (128, 256)}
    assert all(0 <= r["accuracy"] <= 1 and r["key_logprob"] < 0 for r in records)
    assert set(summary["passkey"]) == set(labels) and set(summary["passkey"]["after"]) == {"128", "256"}
    assert set(summary["in_window_bpb"]) == {"books_heldout"}
    with open(out / "passkey.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("passkey at 256: base ") and "-> RoPE alone " in last and "-> after CT " in last
    assert "in-window bits/byte books_heldout " in last


def test_recipe_on_smollm2_is_the_yaml_and_scales_to_another_window(tmp_path):
    """The training config is the recipe with the run's paths on SmolLM2 (nothing rescaled), and
    on a base with another window and theta every length and the stage's theta follow it."""
    example = _example()
    recipe = yaml.safe_load(example.RECIPE.read_text())
    smollm2 = {**recipe["model"], "loss_chunk_size": None}
    cfg = example.training_config(recipe, smollm2, tmp_path, tmp_path / "hf", steps=None)
    assert cfg["data"]["stages"] == recipe["data"]["stages"] and cfg["train"] == recipe["train"]
    assert cfg["model"] == recipe["model"] and cfg["data"]["data_root"] == str(tmp_path / "data")
    assert cfg["checkpoint"]["load"] == str(tmp_path / "ckpt_base") and cfg["checkpoint"]["load_weights_only"]
    small = {**smollm2, "max_position_embeddings": 2048, "rotary_base": 10000.0}
    cfg = example.training_config(recipe, small, tmp_path, tmp_path / "hf", steps=3)
    (stage,) = cfg["data"]["stages"]
    assert (stage["seq_length"], stage["max_position_embeddings"], stage["rotary_base"]) == (4096, 4096, 40000.0)
    assert cfg["data"]["seq_length"] == 512 and cfg["train"]["train_iters"] == 3
    assert cfg["data"]["datasets"]["books"]["upsample_long"]["min_tokens"] == 4096


def test_user_faults_are_one_line(tmp_path, capsys):
    example = _example()
    assert example.main(["--text", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --text ") and "\n" not in err
    assert example.main(["--trials", "0", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: --trials 0 ") and not (tmp_path / "o").exists()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert example.main(["--text", str(folder / "notes.txt"), "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an earlier long_context run's (notes.txt)" in err and (folder / "notes.txt").read_text() == "keep me"
