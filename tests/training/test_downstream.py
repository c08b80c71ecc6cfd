"""Downstream tasks in the training loop: scored at the base line, the interval and the end, on
the training ranks; equal to tools/eval_tasks.py on the saved checkpoint; not scored again after
a restart; config mistakes are one line before any work."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from launch import REPO, run_single, run_torchrun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from convert_helpers import build_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(li) for li in path.read_text().splitlines() if li.strip()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A word-level tokenizer (w3 .. w299) and a 2-template multiple-choice task over its words."""
    root = tmp_path_factory.mktemp("downstream")
    build_tokenizer(root / "tok", 300)
    rng = random.Random(0)
    items = []
    for _ in range(12):
        words = [f"w{rng.randint(3, 299)}" for _ in range(rng.randint(2, 5))]
        items.append({"q": " ".join(words), "choices": [f"w{rng.randint(3, 299)}" for _ in range(3)], "answer": 1})
    (root / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (root / "mc.yaml").write_text(
        "name: tiny_mc\ndata: mc.jsonl\nnum_fewshot: 1\nfields: {question: q, choices: choices, answer: answer}\n"
        "answer_format: index\ntemplates:\n  - {name: plain, prompt: '{q}', choice: '{choice}'}\n"
        "  - {name: arrow, prompt: '{q} w4', choice: '{choice}'}\n"
    )
    return root


def args(setup, log_dir, *extra) -> list[str]:
    return [
        f"data.tokenizer={setup / 'tok'}",
        f"data.downstream_tasks=[{setup / 'mc.yaml'}]",
        "data.eval_baseline=true",
        "data.downstream_interval=2",
        "train.train_iters=4",
        f"logging.log_dir={log_dir}",
        *extra,
    ]


def test_scored_in_the_loop_like_offline_and_not_again_after_a_restart(setup, tmp_path):
    ck, logs = tmp_path / "ck", tmp_path / "logs"
    proc = run_single(args(setup, logs, f"checkpoint.save={ck}", "train.exit_interval=2", "checkpoint.save_interval=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = read_jsonl(logs / "downstream.jsonl")
    assert sorted({r["iteration"] for r in first}) == [0, 2]
    assert {r["trigger"] for r in first if r["iteration"] == 0} == {"baseline"}
    head = [r for r in first if r["metric"] == "acc" and r["template"] == "mean"]
    assert [r["iteration"] for r in head] == [0, 2] and head[0]["change"] == 0
    assert head[1]["base_value"] == head[0]["value"] and head[1]["change"] == pytest.approx(
        head[1]["value"] - head[0]["value"]
    )

    # Offline on the checkpoint saved at iteration 2: the same numbers (fp32, same engine).
    out = tmp_path / "offline.jsonl"
    tool_args = ["--checkpoint", str(ck), "--tokenizer", str(setup / "tok"), "--tasks", str(setup / "mc.yaml")]
    run_torchrun(1, REPO / "tools" / "eval_tasks.py", [*tool_args, "--seq-length", "32", "--output", str(out)])
    offline = {(r["metric"], r["template"]): r["value"] for r in read_jsonl(out)}
    assert {r["iteration"] for r in read_jsonl(out)} == {2}
    for r in (r for r in first if r["iteration"] == 2):
        assert offline[(r["metric"], r["template"])] == pytest.approx(r["value"], abs=1e-6), r

    # Resume: iteration 2 was scored before the save, so only 4 (interval and end) is new.
    proc = run_single(args(setup, logs, f"checkpoint.load={ck}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = read_jsonl(logs / "downstream.jsonl")
    assert sorted({r["iteration"] for r in after}) == [0, 2, 4]
    assert len([r for r in after if r["iteration"] == 2]) == len([r for r in first if r["iteration"] == 2])
    assert {r["trigger"] for r in after if r["iteration"] == 4} == {"end"}
    assert "base -> now | tiny_mc" in proc.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.downstream_tasks=[zh_sentiment]"], "data.downstream_tasks: needs data.tokenizer"),
        (["data.downstream_tasks=[{setup}/missing.yaml]", "data.tokenizer={setup}/tok"], "missing.yaml"),
        (
            [
                "data.downstream_tasks=[{setup}/mc.yaml]",
                "data.tokenizer={setup}/tok",
                "data.max_regression={{nope: 0.1}}",
            ],
            "data.max_regression.nope: expected a validation set or downstream task (tiny_mc), got 'nope'",
        ),
    ],
)
def test_config_mistakes_are_one_line(setup, extra, message):
    proc = run_single([e.format(setup=setup) for e in extra] + ["train.train_iters=1"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("pretrain_ct.py: error: "), proc.stderr
    assert message in lines[0]


def test_regression_guard_on_accuracy():
    from megatron_ct.training.downstream import DownstreamEvaluator

    class Task:
        name = "zh"

    ev = DownstreamEvaluator.__new__(DownstreamEvaluator)
    ev.max_regression, ev.baseline = {"zh": 0.05}, {"zh": 0.80}
    assert ev.regressions({"zh": 0.77}) == []
    (line,) = ev.regressions({"zh": 0.70})
    assert line.startswith("zh accuracy 0.7000, 12.50% under its base value 0.8000 (data.max_regression.zh=0.05)")
