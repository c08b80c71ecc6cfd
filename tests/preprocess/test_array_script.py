"""examples/slurm/preprocess_array.sbatch run as SLURM runs an array: each task its own shard,
the shards together the whole corpus; the last task queues the merge."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")

from material import llama_sp_model_path  # noqa: E402

from megatron_ct.data.indexed import open_indexed  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "slurm" / "preprocess_array.sbatch"


def task(tmp_path, task_id: int, count: int, **extra) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_ARRAY_JOB_ID": "77",
        "SLURM_ARRAY_TASK_ID": str(task_id),
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": str(count - 1),
        "SLURM_ARRAY_TASK_COUNT": str(count),
        "SLURM_CPUS_PER_TASK": "1",
        "INPUT": f"{tmp_path}/in/*.jsonl",
        "TOKENIZER": llama_sp_model_path(),
        "OUT": str(tmp_path / "out" / "web"),
        **extra,
    }
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_array_tasks_write_their_shards_and_the_last_queues_the_merge(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(3):
        lines = [json.dumps({"text": f"file {i} doc {j}"}) for j in range(4)]
        (tmp_path / "in" / f"part{i}.jsonl").write_text("\n".join(lines) + "\n")
    for k in range(2):
        result = task(tmp_path, k, 2)
        assert result.returncode == 0, result.stderr
    shards = sorted((tmp_path / "out").glob("web-*-of-00002_text_document.idx"))
    assert [p.name for p in shards] == ["web-00000-of-00002_text_document.idx", "web-00001-of-00002_text_document.idx"]
    assert sum(len(open_indexed(str(p)[: -len(".idx")])) for p in shards) == 12
    dry = task(tmp_path, 1, 2, DRY_RUN="1", MERGE="1").stdout
    assert "--dependency=afterok:77" in dry
    assert f"tools/merge_datasets.py --input '{tmp_path}/out/web-*-of-00002_text_document'" in dry
