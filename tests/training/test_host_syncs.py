"""The training step brings at most one value to the host on steps that do not log."""

import json
import subprocess
import sys

import pytest

from megatron_ct.parallel.launch import child_env, free_port

from launch import REPO, TINY

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_non_log_steps_sync_at_most_once(tmp_path, precision):
    out = tmp_path / "syncs.json"
    overrides = [
        *TINY,
        f"train.precision={precision}",
        "train.train_iters=6",
        "logging.log_interval=3",
        f"checkpoint.save={tmp_path / 'ck'}",
        "checkpoint.save_on_sigterm=true",
    ]
    env = child_env({"MASTER_PORT": str(free_port())}, threads=1)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "training" / "sync_worker.py"), str(out), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["iteration"]: r["syncs"] for r in json.loads(out.read_text())}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    for it in (1, 2, 4, 5):  # steps that neither log nor save
        assert len(records[it]) <= 1, (it, records[it])
    assert len(records[3]) >= 2  # a log step reduces and reads the loss too: the counter sees it
    # On CPU AdamW runs torch's fused kernel, not megatron-core's per-tensor fallback loop.
    assert all(r["fused_adam"] for r in json.loads(out.read_text()))
