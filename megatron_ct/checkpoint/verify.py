"""What a checkpoint directory must contain, written at save and checked before a load.

After every rank has written its part of a checkpoint, rank 0 records each file's size in
``ct_manifest.json`` inside it (before the checkpoint is published). With ``checkpoint.verify``
each file's SHA-256 is recorded too: every rank hashes a share of the files, rank 0 gathers.

Before a load, every listed file must exist with its recorded size: a missing or truncated
shard is one line naming it, instead of a traceback from deep inside the tensor reader.
With ``checkpoint.verify`` the checksums are compared as well (a flipped bit in a shard is
caught; megatron-core itself has no checksums), each rank checking a share of the files.
Checkpoints without a manifest (older ones, upstream's) are loaded as they are.
"""

from __future__ import annotations

import hashlib
import json
import os

from megatron_ct.atomic import atomic_write
from megatron_ct.errors import CheckpointError

MANIFEST = "ct_manifest.json"


def _files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n != MANIFEST and os.path.isfile(os.path.join(path, n)))


def sha256(file: str) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def share(names: list[str], rank: int, world: int) -> list[str]:
    """The files rank ``rank`` of ``world`` hashes (round robin over the sorted names)."""
    return names[rank::world]


def hash_share(path: str, rank: int, world: int) -> dict[str, str]:
    return {n: sha256(os.path.join(path, n)) for n in share(_files(path), rank, world)}


def write_manifest(path: str, checksums: dict[str, str] | None = None) -> None:
    """Record every file of the (complete, not yet published) checkpoint at ``path``."""
    entries = {n: {"size": os.path.getsize(os.path.join(path, n))} for n in _files(path)}
    for name, digest in (checksums or {}).items():
        entries[name]["sha256"] = digest
    with atomic_write(os.path.join(path, MANIFEST)) as f:
        json.dump({"version": 1, "files": entries}, f, indent=0, sort_keys=True)


def read_manifest(path: str) -> dict | None:
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            return json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{file}: unreadable; expected the checkpoint's file list (JSON)") from None


def check_files(path: str, checksums: bool = False, rank: int = 0, world: int = 1) -> bool:
    """Sizes of every listed file (and, with ``checksums``, this rank's share of the digests).
    Raises CheckpointError naming the first bad file; False when there is no manifest."""
    files = read_manifest(path)
    if files is None:
        return False
    for name, entry in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing; expected it ({entry['size']} bytes) in this checkpoint")
        size = os.path.getsize(file)
        if size != entry["size"]:
            raise CheckpointError(
                f"{file}: {size} bytes; expected {entry['size']} (truncated or replaced since it was saved)"
            )
    if checksums:
        listed = sorted(files)
        for name in share(listed, rank, world):
            want = files[name].get("sha256")
            if want is None:
                raise CheckpointError(
                    f"{os.path.join(path, MANIFEST)}: no checksum for {name}; expected a checkpoint saved with "
                    "checkpoint.verify=true (or load it with checkpoint.verify=false)"
                )
            if sha256(os.path.join(path, name)) != want:
                raise CheckpointError(
                    f"{os.path.join(path, name)}: checksum differs from the one saved; expected the file as written "
                    "(corrupted on disk or in transfer)"
                )
    return True
