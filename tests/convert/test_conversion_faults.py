"""Conversion faults: damaged inputs, an --overwrite that would destroy foreign files, a full
disk mid-write. One line, exit 2; what the user had stays; no half-written output."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_errors import hf_copy, run_cli, to_ct  # noqa: F401  (fixture and helpers)


def test_truncated_or_garbage_safetensors(capsys, hf_copy, tmp_path):  # noqa: F811
    weights = hf_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = to_ct(capsys, hf_copy, tmp_path)
    assert "model.safetensors" in err
    weights.write_bytes(b"not a safetensors file at all")
    assert "model.safetensors" in to_ct(capsys, hf_copy, tmp_path)
    assert not [p for p in tmp_path.rglob("*.partial")]


def test_overwrite_replaces_an_export_but_never_foreign_files(capsys, converted, tmp_path):
    ct = converted["llama_untied_mha"].ct_dir
    out = tmp_path / "hf_out"
    args = ["ct-to-hf", "--input", str(ct), "--output", str(out), "--no-progress"]
    from test_errors import cli

    assert cli.main(args) == 0
    assert cli.main([*args, "--overwrite"]) == 0  # an earlier export is replaced
    (out / "my_notes.txt").write_text("keep me")
    capsys.readouterr()
    err = run_cli(capsys, *args[:-1], "--overwrite")
    assert "my_notes.txt" in err and "does not write" in err
    assert (out / "my_notes.txt").read_text() == "keep me" and (out / "config.json").is_file()
    assert not (tmp_path / "hf_out.partial").exists()


def test_full_disk_during_an_export_leaves_no_partial(converted, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("full-disk test needs a small tmpfs (mount -t tmpfs): not permitted on this machine")
    try:
        from launch import REPO

        proc = subprocess.run(
            [
                os.sys.executable,
                str(REPO / "tools/convert_checkpoint.py"),
                "ct-to-hf",
                "--no-progress",
                "--input",
                str(converted["llama_untied_mha"].ct_dir),
                "--output",
                str(disk / "hf"),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1].startswith("convert_checkpoint.py: error: No space left on device")
        assert "Traceback" not in proc.stderr and sorted(os.listdir(disk)) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_corrupt_checkpoint_shard_is_refused_before_writing(capsys, converted, tmp_path):
    ct = tmp_path / "ct"
    shutil.copytree(converted["llama_untied_mha"].ct_dir, ct)
    shard = next(Path(ct, "iter_0000000").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    err = run_cli(capsys, "ct-to-hf", "--input", str(ct), "--output", str(tmp_path / "out"))
    assert shard.name in err and "bytes; expected" in err and not (tmp_path / "out").exists()
