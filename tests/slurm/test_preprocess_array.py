"""examples/slurm/preprocess_array.sbatch (issue 15) under a real SLURM: a 2-task array writes
its shards, the last task queues the merge, the merged dataset holds every document."""

from __future__ import annotations

import json
import re

import pytest

from launch import REPO

pytestmark = pytest.mark.slow
SCRIPT = REPO / "examples" / "slurm" / "preprocess_array.sbatch"


def test_array_writes_shards_and_merges(cluster, tmp_path):
    if not SCRIPT.exists():
        pytest.skip("examples/slurm/preprocess_array.sbatch is not on this branch yet (issue 15)")
    pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")
    from material import llama_sp_model_path

    from megatron_ct.data.indexed import open_indexed

    (tmp_path / "in").mkdir()
    for i in range(3):
        lines = [json.dumps({"text": f"file {i} doc {j}"}) for j in range(4)]
        (tmp_path / "in" / f"part{i}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "web"
    env = {
        "INPUT": f"{tmp_path}/in/*.jsonl",
        "TOKENIZER": llama_sp_model_path(),
        "OUT": str(out),
        "MERGE": "1",
        # The merge job is submitted from inside the last task: its log goes here, not into the repo.
        "SBATCH_OUTPUT": str(tmp_path / "merge-%j.out"),
    }
    # The script asks for 32 CPUs and 64 GB per task; the test node has neither.
    args = ["--array=0-1", "--cpus-per-task=1", "--mem=100M", f"--output={tmp_path}/%x-%A_%a.out"]
    job = cluster.submit(SCRIPT, [], args, env, cwd=REPO)
    for task in ("0", "1"):
        info = cluster.wait(f"{job}_{task}", {"COMPLETED"}, 180, tmp_path / f"preprocess-{job}_{task}.out")
        assert info["ExitCode"] == "0:0", info
    shards = sorted((tmp_path / "out").glob("web-*-of-00002_text_document.idx"))
    assert [p.name for p in shards] == ["web-00000-of-00002_text_document.idx", "web-00001-of-00002_text_document.idx"]
    assert sum(len(open_indexed(str(p)[: -len(".idx")])) for p in shards) == 12
    # The last task queued the merge (sbatch printed its id into the task's log): wait for that
    # job to complete, so the merged dataset is whole (.bin written, .idx renamed last).
    last_task_log = (tmp_path / f"preprocess-{job}_1.out").read_text()
    merges = re.findall(r"Submitted batch job (\d+)", last_task_log)
    assert len(merges) == 1, last_task_log[-3000:]
    info = cluster.wait(merges[0], {"COMPLETED"}, 120, tmp_path / f"merge-{merges[0]}.out")
    assert info["ExitCode"] == "0:0", info
    merged = tmp_path / "out" / "web_text_document"
    assert len(open_indexed(str(merged))) == 12
