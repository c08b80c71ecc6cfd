"""Checkpoint faults a realistic user meets: each ends in one line and exit 2, nothing is lost.

Corrupted, truncated, missing and crafted checkpoint files; a full disk during a save; a
re-save killed half-way; retention after a rollback; a kill after logging past a checkpoint.
After each, the previous checkpoint still loads and resumes bit-exactly.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_ct.checkpoint import root as ckpt_root
from megatron_ct.errors import CheckpointError

from launch import REPO, losses, read_metrics, run_single, run_trainer

FAULTS = REPO / "tests" / "checkpoint" / "fault_injection.py"
RUN = ["train.train_iters=4", "checkpoint.save_interval=2", "optim.lr_decay_style=cosine"]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run failed with exit 2 and exactly one 'error:' line, no traceback of ours."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [li for li in proc.stderr.splitlines() if "pretrain_ct.py: error:" in li]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4 (and its per-step losses)."""
    root = tmp_path_factory.mktemp("faults")
    run_trainer(1, [*RUN, f"checkpoint.save={root / 'ck'}", "checkpoint.verify=true"])
    return root


def resume_from_2_matches(straight: Path, ck: Path, log: Path) -> None:
    """Nothing was lost: the checkpoint at 2 resumes to the straight run's steps 3 and 4."""
    run_trainer(1, [*RUN, f"checkpoint.load={ck / 'iter_0000002'}", f"logging.log_dir={log}"])
    want = losses(straight / "ck")
    assert losses(log) == {3: want[3], 4: want[4]}


def corrupted_copy(straight: Path, tmp_path: Path) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(straight / "ck", ck)
    return ck


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, expected",
    [
        ("tracker", "latest_checkpointed_iteration.txt: expected an iteration number"),
        ("missing_shard", "__0_0.distcp: missing; expected it"),
        ("truncated_shard", "bytes; expected"),
        ("missing_common", "common.pt: missing"),
        ("missing_metadata", ".metadata: missing"),
        ("flipped_bit", "checksum differs from the one saved"),
        ("missing_dir", "checkpoint.load: "),
    ],
)
def test_corrupt_checkpoint_is_one_line_and_the_previous_one_resumes(straight, tmp_path, fault, expected):
    ck = corrupted_copy(straight, tmp_path)
    it4 = ck / "iter_0000004"
    if fault == "tracker":
        (ck / ckpt_root.TRACKER).write_text("four\n")
    elif fault == "missing_shard":
        (it4 / "__0_0.distcp").unlink()
    elif fault == "truncated_shard":
        data = (it4 / "__0_0.distcp").read_bytes()
        (it4 / "__0_0.distcp").write_bytes(data[: len(data) - 4096])
    elif fault == "missing_common":
        (it4 / "common.pt").unlink()
    elif fault == "missing_metadata":
        (it4 / ".metadata").unlink()
    elif fault == "flipped_bit":
        data = bytearray((it4 / "__0_0.distcp").read_bytes())
        data[len(data) // 2] ^= 0x10  # same size: only a checksum can tell
        (it4 / "__0_0.distcp").write_bytes(bytes(data))
    elif fault == "missing_dir":
        shutil.rmtree(ck)
    load = ck if fault != "missing_dir" else tmp_path / "nowhere"
    proc = run_single([*RUN, "train.train_iters=6", f"checkpoint.load={load}", "checkpoint.verify=true"])
    assert expected in one_error_line(proc)
    if fault in ("flipped_bit", "truncated_shard"):
        resume_from_2_matches(straight, ck, tmp_path / "log")


@pytest.mark.slow
def test_crafted_pickle_in_a_checkpoint_is_refused_and_not_executed(straight, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for victim in ("common.pt", ".metadata"):
        ck = tmp_path / victim.strip(".")
        shutil.copytree(straight / "ck", ck)
        (ck / "iter_0000004" / victim).write_bytes(pickle.dumps({"ct": Payload()}))
        (ck / "iter_0000004" / "ct_manifest.json").unlink()  # a crafted checkpoint brings no honest manifest
        proc = run_single([*RUN, "train.train_iters=6", f"checkpoint.load={ck}"])
        line = one_error_line(proc)
        assert victim in line and "refused" in line, line
        tool = subprocess.run(
            [
                os.sys.executable,
                str(REPO / "tools/expand_blocks.py"),
                "--input",
                str(ck),
                "--output",
                str(tmp_path / "grown"),
                "--every",
                "2",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert tool.returncode == 2 and "refused" in tool.stderr.strip().splitlines()[-1]
        assert not marker.exists()  # never executed


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(straight, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "12M"):
        pytest.skip("disk-full test needs a small tmpfs (mount -t tmpfs): not permitted on this machine")
    try:
        ck = disk / "ck"
        shutil.copytree(straight / "ck" / "iter_0000002", ck / "iter_0000002")
        (ck / ckpt_root.TRACKER).write_text("2")
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 2 * 2**20))  # 2 MB left: a save needs ~12
        proc = run_single([*RUN, f"checkpoint.load={ck}", f"checkpoint.save={ck}"])
        line = one_error_line(proc)
        assert "no space left on device writing" in line and "iteration 2) is intact" in line, line
        assert not [n for n in os.listdir(ck) if n.endswith(".partial")]  # the partial is removed
        assert ckpt_root.saved_iterations(str(ck)) == [2] and ckpt_root.read_tracker(str(ck)) == 2
        filler.unlink()
        resume_from_2_matches(straight, ck, tmp_path / "log")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_logs_after_a_kill_describe_one_run(straight, tmp_path):
    """kill -9 after step 3 (checkpoint at 2): the resumed run's logs hold each step once,
    equal to the straight run's."""
    ck = tmp_path / "ck"
    proc = run_trainer(1, [*RUN, f"checkpoint.save={ck}"], check=False, env={"CT_FAULT": "kill_after:3"}, script=FAULTS)
    assert proc.returncode != 0 and sorted(losses(ck)) == [1, 2, 3]
    run_trainer(1, [*RUN, f"checkpoint.load={ck}", f"checkpoint.save={ck}"])
    iterations = [r["iteration"] for r in read_metrics(ck)]
    assert iterations == [1, 2, 3, 4]
    assert losses(ck) == losses(straight / "ck")


def test_retention_after_a_rollback_keeps_what_it_just_saved(tmp_path):
    """keep_last counts by iteration number and never removes the tracked or newest iteration."""
    root = str(tmp_path)
    for it in (10, 20, 30):
        os.makedirs(ckpt_root.iter_dir(root, it))
    ckpt_root.write_tracker(root, 30)
    ckpt_root.stage(root, 25)  # rolled back to 20, now saving 25
    ckpt_root.publish(root, 25, keep_last=1)
    assert ckpt_root.saved_iterations(root) == [25, 30] and ckpt_root.read_tracker(root) == 25


def test_resave_killed_between_the_renames_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    root = str(tmp_path)
    old = ckpt_root.iter_dir(root, 5)
    os.makedirs(old)
    Path(old, "weights").write_text("old")
    ckpt_root.write_tracker(root, 5)
    Path(ckpt_root.stage(root, 5), "weights").write_text("new")
    real_replace, calls = os.replace, []

    def dies_on_the_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after iter_5 -> iter_5.old, before the new one is in place
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt_root.publish(root, 5)
    monkeypatch.setattr(os, "replace", real_replace)
    path, it = ckpt_root.resolve_load_dir(root)
    assert it == 5 and Path(path, "weights").read_text() == "old"  # the complete previous copy
    Path(ckpt_root.stage(root, 5), "weights").write_text("new")  # the next save recovers
    ckpt_root.publish(root, 5)
    assert Path(ckpt_root.resolve_load_dir(root)[0], "weights").read_text() == "new"
    assert sorted(os.listdir(root)) == ["iter_0000005", ckpt_root.TRACKER]


def test_unreadable_tracker_is_a_checkpoint_error(tmp_path):
    (tmp_path / ckpt_root.TRACKER).write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt"):
        ckpt_root.resolve_load_dir(str(tmp_path))


def test_enospc_is_recognised_through_dcp_wrappers():
    from megatron_ct.checkpoint.dist_ckpt import _is_no_space

    class Wrapped(Exception):
        def __init__(self, failures):
            self.failures = failures

    inner = OSError(errno.ENOSPC, "No space left on device")
    assert _is_no_space(Wrapped({1: inner})) and not _is_no_space(RuntimeError("other"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--use-distributed-optimizer"], "parallel.use_distributed_optimizer: expected false to resume"),
        (["model.num_layers=2"], "model.num_layers: expected 4 (the model of checkpoint"),
        (["model.vocab_size=600"], "model.vocab_size: expected 500 (the vocabulary of checkpoint"),
    ],
    ids=["switch-to-distributed-optimizer", "other-model", "other-vocabulary"],
)
def test_resume_with_a_config_the_checkpoint_does_not_fit(straight, overrides, expected):
    proc = run_single([*RUN, "train.train_iters=6", f"checkpoint.load={straight / 'ck'}", *overrides])
    assert expected in one_error_line(proc)
