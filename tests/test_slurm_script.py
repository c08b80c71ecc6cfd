"""The sbatch script parses and renders the right multi-node torchrun command."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "slurm" / "pretrain_ct.sbatch"


def render(tmp_path, **extra):
    env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ct", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_SUBMIT_DIR": str(REPO), "SAVE_DIR": str(tmp_path / "ck"), "PATH": os.environ["PATH"], **extra}
    env.pop("SLURM_PROCID", None)
    proc = subprocess.run(["bash", str(SCRIPT), "train.train_iters=10"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_two_node_rendezvous(tmp_path):
    cmd = render(tmp_path, BASE_CKPT="base")
    text = " ".join(cmd)
    assert cmd[0] == "torchrun"
    assert "--nnodes 2 --nproc_per_node 8" in text
    assert "--rdzv_backend c10d --rdzv_endpoint gpu07:24242 --rdzv_id 4242" in text
    assert "--shutdown_timeout 420" in text
    # First run: weights only from the base model; overrides pass through last.
    assert "checkpoint.load=base checkpoint.load_weights_only=true" in text
    assert cmd[-1] == "train.train_iters=10"


def test_requeued_job_resumes_from_its_own_checkpoint(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("500")
    text = " ".join(render(tmp_path, BASE_CKPT="base"))
    assert f"checkpoint.load={tmp_path / 'ck'}" in text
    assert "load_weights_only" not in text
