"""megatron_ct/atomic.py: a write killed at any point leaves the old file or none, never a
partial one; a finished write leaves only the final name."""

import os
import signal
import subprocess
import sys

import pytest

from megatron_ct.atomic import atomic_write, temporary_name, write_text_atomic


def test_a_write_publishes_the_whole_file_and_nothing_else(tmp_path):
    write_text_atomic(tmp_path / "rank0", "4\n")
    assert (tmp_path / "rank0").read_text() == "4\n"
    assert os.listdir(tmp_path) == ["rank0"]
    # The temporary name is hidden from the globs readers use (rank*, iter*_rank*.txt).
    assert os.path.basename(temporary_name(str(tmp_path / "rank0"))).startswith(".rank0.")


def test_a_failed_write_keeps_the_old_file(tmp_path):
    write_text_atomic(tmp_path / "f", "old")
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "f") as f:
        f.write("new, cut short")
        raise RuntimeError
    assert (tmp_path / "f").read_text() == "old"
    assert os.listdir(tmp_path) == ["f"]


@pytest.mark.parametrize("before", [None, "old"])
def test_kill_9_in_the_middle_leaves_the_old_file_or_none(tmp_path, before):
    path = tmp_path / "f"
    if before is not None:
        path.write_text(before)
    writer = (
        "import sys, time\n"
        "from megatron_ct.atomic import atomic_write\n"
        "with atomic_write(sys.argv[1]) as f:\n"
        "    f.write('half'); f.flush(); print('writing', flush=True); time.sleep(60); f.write('done')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    assert (path.read_text() if path.exists() else None) == before
