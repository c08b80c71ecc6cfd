"""tools/sweep_mixture.py and tools/fit_mixture.py without training: the sweep's configs and
SLURM array, proxy-run directories read back (ratio, tokens, model size), a fit of a sweep
whose eval.jsonl files come from a known law, and the refusals (one line, exit code 2)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mixture_synthetic import DOMAIN, GENERAL, observations, true_laws, write_jsonl

from megatron_ct.config import load_config
from megatron_ct.config.schema import StageConfig
from megatron_ct.errors import DataError
from megatron_ct.families import family_of
from megatron_ct.mixture.observations import read_run
from megatron_ct.mixture.recommend import recommend_constrained

from launch import REPO

sys.path.insert(0, str(REPO / "tools"))
import fit_mixture  # noqa: E402
import sweep_mixture  # noqa: E402

pytest.importorskip("scipy")

BASE = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 128, "vocab_size": 500, "max_position_embeddings": 64},
    "parallel": {"device": "cpu"},
    "train": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 48, "precision": "fp32"},
    "data": {
        "seq_length": 32,
        "data_root": "data",
        "datasets": {"en": "en_text_document", "zh": "zh_text_document", "code": "code_text_document"},
        "stages": [
            {"name": "warm", "iters": 4, "blend": {"en": 1.0}},
            {"name": "mix", "iters": 36, "blend": {"en": 0.3, "code": 0.1, "zh": 0.6},
             "end_blend": {"en": 0.2, "code": 0.1, "zh": 0.7}},
            {"name": "tail", "blend": {"zh": 1.0}},
        ],
        "valid": {"general": "en", "zh": "zh"},
        "eval_interval": 4,
    },
    "checkpoint": {"save": "runs/should_not_be_used"},
}  # fmt: skip
TOKENS_PER_ITER = 4 * 32


@pytest.fixture
def base(tmp_path) -> str:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return str(path)


def sweep(base, out, *extra, ratios="0,0.25,0.5,0.75") -> list[str]:
    return ["--config", base, "--domain", "zh", "--general", "en,code", "--ratios", ratios,
            "--stage", "mix", "--out", str(out), *extra]  # fmt: skip


def run_tool(module, argv, capsys) -> tuple[int, str, str]:
    rc = module.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_sweep_writes_one_config_per_point_with_the_ratio_in_the_swept_stage(base, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc, stdout, err = run_tool(sweep_mixture, sweep(base, out, "--dry-run", "train.seed=7"), capsys)
    assert rc == 0 and "4 point(s)" in stdout, err
    names = [p["name"] for p in json.loads((out / "sweep.json").read_text())["points"]]
    assert names == ["r0", "r0.25", "r0.5", "r0.75"]
    cfg = load_config(str(out / "r0.25" / "config.yaml"))  # what pretrain_ct.py --config reads
    warm, mix = cfg.data.stages  # 'tail' is not at ratio r: the proxy ends with 'mix'
    assert cfg.train.train_iters == 40
    assert warm.blend == {"en": 1.0}  # not swept
    # zh gets r; en and code share 1 - r in the recipe's 3:1 proportion; the ramp is dropped.
    assert mix.blend == pytest.approx({"zh": 0.25, "en": 0.5625, "code": 0.1875}) and mix.end_blend is None
    assert cfg.train.seed == 7 and cfg.logging.log_dir == str(out / "r0.25")
    assert cfg.checkpoint.save is None  # proxies are measured by their evals; no shared save directory
    info = read_run_info(out / "r0.25")
    assert info.ratio == 0.25 and info.start_iter == 4 and info.tokens_per_iter == TOKENS_PER_ITER


def read_run_info(path):
    from megatron_ct.mixture.observations import run_info

    return run_info(str(path))[0]


def test_token_budgets_and_model_sizes_multiply_the_points(base, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = sweep(base, out, "--dry-run", "--tokens", "2048,4096", "--model", "s:model.hidden_size=32",
                 "--model", "m:model.hidden_size=64", ratios="0.2,0.8")  # fmt: skip
    assert run_tool(sweep_mixture, argv, capsys)[0] == 0
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert len(points) == 8
    p = next(p for p in points if p["name"] == "r0.8_tok4096_s")
    cfg = load_config(str(out / p["name"] / "config.yaml"))
    assert cfg.model.hidden_size == 32 and p["params"] == family_of(cfg.model).num_parameters(cfg.model)
    assert cfg.train.train_iters == 4 + 4096 // TOKENS_PER_ITER  # the warm stage, then the budget


def test_rerun_skips_finished_points_and_refuses_stale_logs(base, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run_tool(sweep_mixture, sweep(base, out, "--dry-run"), capsys)[0] == 0
    from megatron_ct.mixture.sweep import SweepSpec, plan_sweep, point_state

    spec = SweepSpec(base_config=base, out=str(out), domain=["zh"], general=["en", "code"],
                     ratios=[0.0, 0.25, 0.5, 0.75], stages=["mix"])  # fmt: skip
    points = plan_sweep(spec)
    assert {point_state(p) for p in points} == {"new"}
    (out / "r0.25" / "eval.jsonl").write_text("{}\n")  # a crashed earlier attempt
    rc, _, err = run_tool(sweep_mixture, sweep(base, out, "--dry-run"), capsys)
    assert rc == 2 and err.count("\n") == 1 and "r0.25: holds logs of an unfinished run" in err
    assert run_tool(sweep_mixture, sweep(base, out, "--dry-run", "--force"), capsys)[0] == 0
    assert (out / "r0.25" / "previous-1" / "eval.jsonl").exists() and not (out / "r0.25" / "eval.jsonl").exists()


@pytest.mark.parametrize(
    "argv_extra, ratios, message",
    [
        (["--general", "en"], "0.5", "data.stages[1].blend.code: dataset in neither --domain nor --general"),
        (["--eval-interval", "20"], "0.5", "the fit needs at least 3 evaluations per run"),
        ([], "0.5,1.5", "--ratios: expected domain shares in [0, 1], got 1.5"),
        (["model.hidden_size=63"], "0.5", "model.hidden_size: expected a multiple of num_attention_heads"),
        (
            [
                "data.stages=[{name: warm, iters: 4, blend: {en: 1.0}}, {name: mix, blend: {en: 0.4, zh: 0.6}, "
                "seq_length: 64}]"
            ],
            "0.5",
            "data.stages: expected one sequence length over the swept stages (a token budget is steps x global "
            "batch x length), got [32, 64]",
        ),
    ],
)
def test_sweep_refusals_are_one_line(base, tmp_path, capsys, argv_extra, ratios, message):
    argv = ["--config", base, "--domain", "zh", "--general", "en,code", "--ratios", ratios,
            "--out", str(tmp_path / "s"), "--dry-run", *argv_extra]  # fmt: skip
    rc, _, err = run_tool(sweep_mixture, argv, capsys)
    assert rc == 2 and err.startswith("sweep_mixture.py: error: ") and err.count("\n") == 1, err
    assert message in err


def test_slurm_array_script_runs_one_point_per_task(base, tmp_path, capsys):
    out, script = tmp_path / "sweep", tmp_path / "sweep.sbatch"
    argv = sweep(base, out, "--slurm-array", str(script), "--nproc", "8", "--sbatch-option=--time=2:00:00")
    assert run_tool(sweep_mixture, argv, capsys)[0] == 0
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and "#SBATCH --time=2:00:00" in text and "#SBATCH --gpus-per-node=8" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "SLURM_ARRAY_TASK_ID": "2"}
    cmd = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert cmd[:4] == ["torchrun", "--standalone", "--nproc_per_node", "8"]
    assert cmd[-2:] == ["--config", str(out / "r0.5" / "config.yaml")] and cmd[-3].endswith("pretrain_ct.py")
    assert not (out / "r0.5" / "train.log").exists()  # nothing ran


def fake_eval(run_dir: Path, ratio: float, iterations, seed: int) -> None:
    """eval.jsonl as the trainer writes it, losses from the known laws (plus 0.2% noise), with a
    base-line record at iteration 0 and a record repeated by a resumed run."""
    rng = np.random.default_rng(seed)
    lines = []
    for it in [0, *iterations]:
        d = max(it - 4, 1) * TOKENS_PER_ITER * 1e5  # as if each step were 1e5 times larger
        for name, law, own in (("zh", DOMAIN, ratio), ("general", GENERAL, 1 - ratio)):
            loss = float(law.predict(1, d, own)) * (1 + 0.002 * rng.standard_normal())
            lines.append({"iteration": it, "stage": "mix", "trigger": "interval", "set": name, "loss": loss,
                          "tokens": 100, "bytes": None, "bits_per_byte": None})  # fmt: skip
    lines.append({**lines[-1], "loss": lines[-1]["loss"]})  # resumed: same iteration again
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_fit_reads_a_sweep_directory_and_recommends_the_true_ratio(base, tmp_path, capsys):
    out = tmp_path / "sweep"
    ratios = (0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
    assert run_tool(sweep_mixture, sweep(base, out, "--dry-run", ratios=",".join(map(str, ratios))), capsys)[0] == 0
    for k, r in enumerate(ratios):
        fake_eval(out / f"r{r:g}", r, range(8, 44, 4), seed=k)
    obs, info = read_run(str(out / "r0.25"))
    assert [o.tokens for o in obs if o.set == "zh"] == [(it - 4) * TOKENS_PER_ITER for it in range(8, 44, 4)]
    assert info.domain == pytest.approx({"zh": 0.25}) and info.general == pytest.approx({"en": 0.5625, "code": 0.1875})

    fit_dir = tmp_path / "fit"
    target = 2e9 / 1e5  # in the runs' token units
    argv = [str(out), "--domain-set", "zh", "--general-set", "general", "--out", str(fit_dir),
            "--target-tokens", str(target), "--emit-stage", "zh_ct"]  # fmt: skip
    rc, stdout, stderr = run_tool(fit_mixture, argv, capsys)
    assert rc == 0, stderr
    report = json.loads((fit_dir / "fit.json").read_text())
    assert (fit_dir / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom, gen = true_laws("zh", "general")
    truth = recommend_constrained(dom, gen, 1, target * 1e5, 0.02, search=(0, 0.85))
    assert report["recommended_ratio"] == pytest.approx(truth.ratio, abs=0.05)
    assert report["inputs"]["ratios"] == list(ratios) and report["inputs"]["params"] == [count_parameters_base()]
    assert report["sets"]["zh"]["heldout"]["points"] == len(ratios)
    assert report["stop_tokens"]["tokens"] > 0 and report["stop_tokens"]["per"] == "doubling of tokens"
    # --emit-stage: stdout is the stage block alone; a valid stage with the recommended blend.
    (stage,) = yaml.safe_load(stdout)
    parsed = StageConfig.parse(stage, "emitted")
    r = report["recommended_ratio"]
    assert parsed.blend == pytest.approx({"zh": r, "en": (1 - r) * 0.75, "code": (1 - r) * 0.25}, abs=1e-6)
    assert parsed.tokens == round(target) and "recommended domain ratio" in stderr


def test_a_run_not_made_by_the_sweep_is_read_with_named_domain_data_and_stage(tmp_path):
    """Its config.yaml (the recipe itself: mix at zh 0.6 ramping, then 'tail'): evaluations before
    'mix' starts, at iteration 0 and after 'mix' ends are not at the ratio and are skipped."""
    run = tmp_path / "run"
    run.mkdir()
    raw = {**BASE, "data": {**BASE["data"], "stages": [dict(s) for s in BASE["data"]["stages"]]}}
    del raw["data"]["stages"][1]["end_blend"]
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    records = [{"iteration": it, "set": "zh", "loss": 3.0 - it / 100} for it in (0, 4, 8, 20, 40, 44, 48)]
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match="no mixture_point.json; name the domain datasets"):
        read_run(str(run))
    with pytest.raises(DataError, match="--stage warm,tail: swept stages must follow one another"):
        read_run(str(run), domain=["zh"], stages=["warm", "tail"])
    obs, info = read_run(str(run), domain=["zh"], stages=["mix"])
    assert info.ratio == pytest.approx(0.6) and (info.start_iter, info.end_iter) == (4, 40)
    assert [(o.tokens, o.loss) for o in obs] == [((it - 4) * TOKENS_PER_ITER, 3.0 - it / 100) for it in (8, 20, 40)]


def count_parameters_base() -> int:
    m = load_config(None, [f"model.{k}={v}" for k, v in BASE["model"].items()]).model
    return family_of(m).num_parameters(m)


def test_count_parameters_matches_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    cfg = load_config(None, [f"model.{k}={v}" for k, v in BASE["model"].items()]).model
    hf = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=500, tie_word_embeddings=False,
    )  # fmt: skip
    assert family_of(cfg).num_parameters(cfg) == transformers.LlamaForCausalLM(hf).num_parameters()


@pytest.fixture
def obs_file(tmp_path):
    return lambda records: write_jsonl(tmp_path / "obs.jsonl", records)


def fit_argv(path, out, *extra):
    return ["--observations", path, "--domain-set", "zh", "--general-set", "en", "--out", str(out), *extra]


@pytest.mark.parametrize(
    "records, extra, message",
    [
        (observations(0, ratios=(0.1, 0.5, 0.9)), [],
         "set 'zh': 3 distinct ratio(s) (0.1, 0.5, 0.9); fitting E, C, gamma and eps needs at least 4"),
        ([r for r in observations(0) if r["set"] == "zh"], [],
         "--general-set en: no observations of set 'en' (sets found: zh)"),
        (observations(0)[:3] + [{**observations(0)[3], "loss": float("nan")}] + observations(0)[4:], [],
         "obs.jsonl:4: loss is nan (non-finite)"),
        (observations(0), ["--max-general-regression", "-0.1"], "--max-general-regression: expected a number >= 0"),
        (observations(0), ["--emit-stage"], "--emit-stage: dataset names unknown; fit proxy-run directories or give"),
        (observations(0, params=(1e8,)), ["--target-params", "7e9"],
         "--target-params 7e+09: the runs have one model size (1e+08), which cannot predict another"),
    ],
)  # fmt: skip
def test_fit_refusals_are_one_line_with_exit_code_2(obs_file, tmp_path, capsys, records, extra, message):
    rc, stdout, err = run_tool(fit_mixture, fit_argv(obs_file(records), tmp_path / "fit", *extra), capsys)
    assert rc == 2 and err.startswith("fit_mixture.py: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "fit" / "fit.json").exists()


def test_weighted_objective_from_an_observations_file(obs_file, tmp_path, capsys):
    argv = fit_argv(obs_file(observations(3)), tmp_path / "fit", "--objective", "weighted",
                    "--domain-weight", "0.3", "--target-tokens", "2e9", "--domain-data", "zh",
                    "--general-data", "en", "--emit-stage")  # fmt: skip
    rc, stdout, err = run_tool(fit_mixture, argv, capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert report["recommendation"]["objective"] == "weighted" and report["recommendation"]["domain_weight"] == 0.3
    grid = np.linspace(0, 0.85, 8501)
    dom, gen = true_laws()
    truth = grid[np.argmin(0.3 * dom.loss(1e8, 2e9, grid) + 0.7 * gen.loss(1e8, 2e9, grid))]
    assert 0.1 < truth < 0.75 and report["recommended_ratio"] == pytest.approx(truth, abs=0.05)
    (stage,) = yaml.safe_load(stdout)
    r = report["recommended_ratio"]
    assert stage == {"name": "mixture", "tokens": 2000000000, "blend": {"zh": r, "en": pytest.approx(1 - r)}}


def test_three_model_sizes_predict_a_larger_target(obs_file, tmp_path, capsys):
    dom = dataclasses.replace(DOMAIN, E=1.3, A=200.0, alpha=0.34)
    records = observations(2, params=(1e7, 3e7, 1e8), laws=(dom, GENERAL))
    argv = fit_argv(obs_file(records), tmp_path / "fit", "--target-params", "4e8", "--target-tokens", "2e9",
                    "--holdout", "none")  # fmt: skip
    rc, _, err = run_tool(fit_mixture, argv, capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert report["target"] == {"tokens": 2e9, "params": 4e8} and report["inputs"]["params"] == [1e7, 3e7, 1e8]
    assert "alpha" in report["sets"]["zh"]["fitted"]
    ratios = np.array(report["predictions"]["ratio"][1:86])
    predicted = np.array(report["predictions"]["zh"][1:86])
    assert np.abs(predicted / dom.predict(4e8, 2e9, ratios) - 1).max() < 0.02
    assert (tmp_path / "fit" / "fit.png").exists()


def test_non_finite_loss_in_a_run_is_refused_naming_the_file(base, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run_tool(sweep_mixture, sweep(base, out, "--dry-run"), capsys)[0] == 0
    for k, r in enumerate((0.0, 0.25, 0.5, 0.75)):
        fake_eval(out / f"r{r:g}", r, range(8, 44, 4), seed=k)
    path = out / "r0.5" / "eval.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = lines[6].replace('"loss": ', '"loss": NaN, "was": ')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"{path}:7: loss is nan"):
        read_run(str(out / "r0.5"))
    rc, _, err = run_tool(fit_mixture, [str(out), "--domain-set", "zh", "--general-set", "general",
                                        "--out", str(tmp_path / "fit")], capsys)  # fmt: skip
    assert rc == 2 and err.count("\n") == 1 and "eval.jsonl:7: loss is nan" in err


def test_cli_help_and_an_error_from_a_real_process(tmp_path):
    for tool in ("fit_mixture.py", "sweep_mixture.py"):
        proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "D-CPT" in proc.stdout
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "fit_mixture.py"), str(tmp_path), "--domain-set", "a",
         "--general-set", "b", "--out", str(tmp_path / "fit")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    expected = f"{tmp_path}: not a proxy-run directory (config.yaml) or a sweep directory (sweep.json)"
    assert proc.stderr == f"fit_mixture.py: error: {expected}\n"
