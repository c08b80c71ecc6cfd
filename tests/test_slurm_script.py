"""The sbatch script renders the right srun command (DRY_RUN=1, no SLURM needed).

tests/slurm/ runs it under a real SLURM (signals, requeue, resume)."""

import os
import signal
import subprocess

import pytest

from launch import REPO, wait_for

SCRIPT = REPO / "examples" / "slurm" / "pretrain_ct.sbatch"


def render(tmp_path, **extra):
    env = {
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ct",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_ON_NODE": "128",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SAVE_DIR": str(tmp_path / "ck"),
        "PATH": os.environ["PATH"],
        **extra,
    }
    proc = subprocess.run(["bash", str(SCRIPT), "train.train_iters=10"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_one_torchrun_per_node_one_process_per_gpu(tmp_path):
    cmd = render(tmp_path, BASE_CKPT="base")
    text = " ".join(cmd)
    assert cmd[:3] == ["MASTER_ADDR=gpu07", "MASTER_PORT=24242", "srun"]
    # One task per node with the node's CPUs; the step asks for the GPUs (--exclusive alone gives
    # them to the job, not to its steps).
    assert "srun --ntasks 2 --ntasks-per-node 1 --cpus-per-task 128 --gpus-per-node 8 --kill-on-bad-exit=1" in text
    # torchrun (kept in SLURM's process group) starts 8 ranks per node; the c10d rendezvous at the
    # first node, its id this run of the job (a requeued run does not meet a stale one).
    assert (
        "python3 -m megatron_ct.parallel.slurm_torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d "
        "--rdzv-endpoint gpu07:24242 --rdzv-id 4242.0 --max-restarts 0 "
        "pretrain_ct.py --config examples/llama2_7b_ct_bf16.yaml" in text
    )
    # First run: weights only from the base model; overrides pass through last.
    assert "checkpoint.load=base checkpoint.load_weights_only=true" in text
    assert cmd[-1] == "train.train_iters=10"


def test_requeued_job_resumes_from_its_own_checkpoint(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("500")
    text = " ".join(render(tmp_path, BASE_CKPT="base", SLURM_RESTART_COUNT="3"))
    assert f"checkpoint.load={tmp_path / 'ck'}" in text
    assert "load_weights_only" not in text
    assert "--rdzv-id 4242.3" in text  # a rendezvous of its own


def test_srun_launcher_starts_every_rank(tmp_path):
    # LAUNCHER=srun: no agent, one task per rank (ranks from SLURM's variables).
    text = " ".join(render(tmp_path, LAUNCHER="srun", TRAIN_SCRIPT="wrap.py"))
    assert "srun --ntasks 16 --ntasks-per-node 8 --cpus-per-task 16 --gpus-per-node 8 --kill-on-bad-exit=1" in text
    assert "python3 wrap.py --config examples/llama2_7b_ct_bf16.yaml" in text
    assert "torchrun" not in text


def test_unknown_launcher_is_refused_in_one_line(tmp_path):
    env = {
        "DRY_RUN": "1",
        "LAUNCHER": "mpirun",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_JOB_ID": "1",
        "PATH": os.environ["PATH"],
    }
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "error: LAUNCHER=mpirun (examples/slurm/pretrain_ct.sbatch): expected torchrun or srun\n"


def test_requests_and_processes_follow_the_environment(tmp_path):
    # No GPU visible: one process per node unless NPROC_PER_NODE says otherwise.
    no_gpu = {"SLURM_GPUS_ON_NODE": "0", "SLURM_CPUS_ON_NODE": "4", "SLURM_NNODES": "1"}
    text = " ".join(render(tmp_path, **no_gpu))
    assert "--ntasks 1 --ntasks-per-node 1 --cpus-per-task 4 --kill-on-bad-exit=1" in text
    assert "--nnodes 1 --nproc-per-node 1 " in text
    text = " ".join(
        render(
            tmp_path, **no_gpu, NPROC_PER_NODE="2", CPUS_PER_PROC="1", CONFIG="", PYTHON="apptainer exec ct.sif python3"
        )
    )
    assert "--ntasks 1 --ntasks-per-node 1 --cpus-per-task 2 --kill-on-bad-exit=1" in text
    # The agent runs in the container; its ranks with its interpreter. Empty CONFIG: no --config.
    assert "apptainer exec ct.sif python3 -m megatron_ct.parallel.slurm_torchrun --nnodes 1 --nproc-per-node 2" in text
    assert "--max-restarts 0 pretrain_ct.py checkpoint.save=" in text


def test_job_log_goes_where_the_job_can_always_open_it():
    # SLURM opens the --output file before the script runs: a directory that may not exist
    # (logs/) would fail the job with nothing written anywhere.
    lines = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH --output")]
    assert lines == ["#SBATCH --output=%x-%j.out"]


# The signal handling of the script, against stand-ins for srun, scancel and scontrol (tests/slurm/
# runs it under a real SLURM). The stand-in trainer saves iteration 7 when it gets SIGTERM; it
# writes its pid once its trap is set, and idles in `wait`, which a trapped signal interrupts.
STUBS = {
    "srun": """#!/bin/bash
if [ -n "${FAIL_RC:-}" ]; then  # the step fails at once (a lost node), after a save or not
  [ "$SAVES" = 1 ] && echo 7 > "$SAVE_DIR/latest_checkpointed_iteration.txt"
  if [ -n "${STATUS+set}" ]; then  # what a trainer leaves (megatron_ct/cli.py record_exit_status)
    mkdir -p "$MEGATRON_CT_STATUS_DIR" && printf '%s' "$STATUS" > "$MEGATRON_CT_STATUS_DIR/rank1"
  fi
  exit "$FAIL_RC"
fi
trap 'kill "$IDLE"; [ "$SAVES" = 1 ] && echo 7 > "$SAVE_DIR/latest_checkpointed_iteration.txt"; exit 0' TERM
sleep infinity >/dev/null 2>&1 &
IDLE=$!
echo $$ > "$STUB/trainer.pid"
wait
""",
    "scancel": """#!/bin/bash
echo "scancel $*" >> "$STUB/calls"
kill -TERM "$(cat "$STUB/trainer.pid")"
""",
    "scontrol": """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node1 ;;
  "show node") echo "NodeName=node1 Arch=x86_64 NodeAddr=10.0.0.1 NodeHostName=node1" ;;
  "show job") echo "JobId=$SLURM_JOB_ID JobState=$JOB_STATE PreemptTime=${PREEMPT_TIME:-None}" ;;
  *) echo "scontrol $*" >> "$STUB/calls" ;;
esac
""",
}


def stub_env(tmp_path, saves=True, job_state="RUNNING", **extra):
    """The stand-ins on PATH, a fresh save directory, and the job's SLURM variables."""
    stub = tmp_path / "stub"
    (stub / "bin").mkdir(parents=True)
    for name, text in STUBS.items():
        (stub / "bin" / name).write_text(text)
        (stub / "bin" / name).chmod(0o755)
    (stub / "calls").touch()
    (tmp_path / "ck").mkdir()
    return stub, {
        "PATH": f"{stub / 'bin'}:{os.environ['PATH']}",
        "STUB": str(stub),
        "SAVES": "1" if saves else "0",
        "JOB_STATE": job_state,
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "SLURM_GPUS_ON_NODE": "0",
        "SLURM_CPUS_ON_NODE": "2",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SAVE_DIR": str(tmp_path / "ck"),
        **extra,
    }


def run_signalled(tmp_path, sig, job_state="RUNNING", saves=True, preempt_time=None):
    """Start the script, send ``sig`` to it (None: to nobody) as SLURM would, and SIGTERM to
    the trainer when SLURM itself would signal the steps; returns (exit code, calls, output)."""
    stub, env = stub_env(tmp_path, saves, job_state, **({"PREEMPT_TIME": preempt_time} if preempt_time else {}))
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def trainer_started() -> bool:
        assert proc.poll() is None, f"the script exited {proc.returncode}:\n{proc.stdout.read()}"
        return (stub / "trainer.pid").exists() and (stub / "trainer.pid").read_text().strip() != ""

    wait_for(trainer_started, 10, "the stand-in trainer to start (its pid file)")
    if sig is not None:
        proc.send_signal(sig)
    if job_state != "RUNNING" or sig is None:  # SLURM itself signals every step of a job it ends
        os.kill(int((stub / "trainer.pid").read_text()), signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=10)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the stand-in trainer too, should the script have failed
        except ProcessLookupError:
            pass
    return proc.returncode, (stub / "calls").read_text().splitlines(), out


def test_time_limit_warning_saves_then_requeues(tmp_path):
    rc, calls, out = run_signalled(tmp_path, signal.SIGUSR1)
    assert rc == 0, out
    assert calls == ["scancel --signal=TERM 42", "scontrol requeue 42"]  # the steps, then the requeue
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "7"


def test_time_limit_warning_without_a_new_save_does_not_requeue(tmp_path):
    # --time shorter than the USR1 lead: the warning comes at every start, before any save.
    rc, calls, out = run_signalled(tmp_path, signal.SIGUSR1, saves=False)
    assert rc == 1
    assert calls == ["scancel --signal=TERM 42"]
    assert "not requeued" in out


def test_scancel_is_not_requeued(tmp_path):
    # A plain scancel: the job has left RUNNING and SLURM signals the trainers itself.
    rc, calls, out = run_signalled(tmp_path, signal.SIGTERM, job_state="COMPLETING")
    assert rc == 0, out
    assert calls == [], out  # neither scancel nor requeue
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "7"


def test_preemption_with_grace_time_is_requeued_after_the_save(tmp_path):
    # SLURM signals the steps only, not the script: the trainers save and exit 0 early.
    rc, calls, out = run_signalled(tmp_path, None, preempt_time="2026-01-01T00:00:00")
    assert rc == 0, out
    assert calls == ["scontrol requeue 42"]


def run_failing(tmp_path, rc, saves, status=None):
    """The script with a step that fails at once with exit ``rc`` (a lost node: SIGKILLed tasks,
    srun's status 137), having saved a checkpoint first or not, a trainer having left its exit
    ``status`` (a number, or the file's text) or not; returns (exit code, calls, output)."""
    extra = {} if status is None else {"STATUS": f"{status}\n" if isinstance(status, int) else status}
    stub, env = stub_env(tmp_path, saves, FAIL_RC=str(rc), **extra)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    return proc.returncode, (stub / "calls").read_text().splitlines(), proc.stdout + proc.stderr


def test_rendezvous_at_the_first_nodes_address(tmp_path):
    # The stand-in scontrol gives node1 the NodeAddr 10.0.0.1 (names need not resolve).
    stub, env = stub_env(tmp_path, PYTHON="true")
    (stub / "bin" / "srun").write_text('#!/bin/bash\necho "MASTER_ADDR=$MASTER_ADDR"\n')
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "MASTER_ADDR=10.0.0.1"


def test_lost_node_after_a_new_save_is_requeued(tmp_path):
    rc, calls, out = run_failing(tmp_path, 137, saves=True)
    assert rc == 0, out
    assert calls == ["scontrol requeue 42"]
    assert "the trainers failed (exit 137: a lost node or a crashed rank); requeueing" in out


def test_failure_without_a_new_save_is_not_requeued(tmp_path):
    # The same failure again before the next checkpoint: requeueing would loop.
    rc, calls, out = run_failing(tmp_path, 137, saves=False)
    assert rc == 137
    assert calls == []
    assert "no checkpoint since this run started: not requeued" in out


@pytest.mark.parametrize("status", [2, 3])  # a config or input error; train.nan_policy=stop
def test_trainers_own_stops_are_not_requeued(tmp_path, status):
    rc, calls, out = run_failing(tmp_path, status, saves=True)
    assert rc == status
    assert calls == [], out


@pytest.mark.parametrize("status", [2, 3])
def test_trainers_status_wins_over_sruns(tmp_path, status):
    # srun reports the largest status over its tasks: 143 for those it terminated after the
    # first failure. The trainer's own status file says what happened.
    rc, calls, out = run_failing(tmp_path, 143, saves=True, status=status)
    assert rc == status, out
    assert calls == [], out
    assert not (tmp_path / "ck" / "exit_status").exists()  # read, then removed


def test_hang_status_is_requeued_after_a_new_save(tmp_path):
    rc, calls, out = run_failing(tmp_path, 143, saves=True, status=4)
    assert rc == 0, out
    assert calls == ["scontrol requeue 42"]
    assert "hang detected (exit 4, stacks in" in out


@pytest.mark.parametrize("text", ["", "garbage\n"])
def test_an_unreadable_status_file_falls_back_to_sruns(tmp_path, text):
    # An empty file (what a trainer killed mid-write would leave, were the file not written
    # atomically) or a stray one is ignored: srun's 143 (a lost node) decides.
    rc, calls, out = run_failing(tmp_path, 143, saves=True, status=text)
    assert rc == 0, out
    assert calls == ["scontrol requeue 42"]
    assert "the trainers failed (exit 143: a lost node or a crashed rank); requeueing" in out
