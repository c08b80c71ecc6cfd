"""The on-disk layout of a checkpoint root, and the one way a checkpoint becomes "latest".

::

    iter_0000100/                      one megatron-core dist checkpoint
    latest_checkpointed_iteration.txt  "100" (Megatron-LM's tracker name)

Every writer (the trainer's saves, ``hf-to-ct``, block and vocabulary expansion, merges) goes
through :func:`stage` / :func:`publish`:

1. ``stage``: remove leftovers of interrupted saves (``*.partial``), create ``iter_N.partial``;
2. the caller writes the checkpoint into it;
3. ``publish``: rename it to ``iter_N`` -- when ``iter_N`` exists (saving the same iteration
   again), the old one is first renamed to ``iter_N.old`` and removed only after the new one
   is in place and tracked, so a kill at any moment leaves a complete checkpoint that the
   tracker (or the recovery in :func:`resolve_load_dir`) finds -- then write the tracker
   atomically (temp, fsync, rename), then apply retention.

Retention (``keep_last``) counts iterations by number and never removes the tracked
iteration or the newest one, so a rollback (``checkpoint.load=.../iter_N``) that saves older
iterations than exist cannot delete what it just saved.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from megatron_ct.atomic import write_text_atomic
from megatron_ct.errors import CheckpointError

log = logging.getLogger("megatron_ct")

TRACKER = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"^iter_(\d{7,})$")


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int | None:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    try:
        text = open(path).read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}); expected an iteration number") from None
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, got {text[:40]!r}")
    return int(text)


def write_tracker(root: str, iteration: int) -> None:
    """Atomically point the tracker at ``iteration``: call only once that checkpoint is complete."""
    write_text_atomic(os.path.join(root, TRACKER), str(iteration))


def saved_iterations(root: str) -> list[int]:
    """Complete iterations present under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(
        int(m.group(1)) for n in os.listdir(root) if (m := _ITER.match(n)) and os.path.isdir(os.path.join(root, n))
    )


def resolve_load_dir(load: str, key: str = "checkpoint.load") -> tuple[str, int]:
    """``load`` may be a save root (follow its tracker) or one ``iter_*`` directory."""
    if not os.path.exists(load):
        raise CheckpointError(f"{key}: {load} does not exist; expected a checkpoint directory")
    it = read_tracker(load)
    if it is not None:
        path = iter_dir(load, it)
        if not os.path.isdir(path) and os.path.isdir(path + ".old"):
            # Killed while re-saving this iteration: the previous copy is complete.
            log.warning("%s is missing; using %s (a re-save of that iteration was interrupted)", path, path + ".old")
            return path + ".old", it
        if not os.path.isdir(path):
            raise CheckpointError(
                f"{key}: {os.path.join(load, TRACKER)} names iteration {it} but {path} is missing; expected that "
                "directory (or point checkpoint.load at an existing iter_* directory)"
            )
        return path, it
    if os.path.isfile(os.path.join(load, "metadata.json")):
        m = _ITER.match(os.path.basename(os.path.normpath(load)))
        return load, int(m.group(1)) if m else 0
    raise CheckpointError(
        f"{key}: {load} has neither {TRACKER} nor a dist checkpoint (metadata.json); expected a save root or an "
        "iter_* directory"
    )


def stage(root: str, iteration: int) -> str:
    """Create (empty) and return ``iter_N.partial``; leftovers of interrupted saves are removed."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.endswith(".partial"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    partial = iter_dir(root, iteration) + ".partial"
    os.makedirs(partial)
    return partial


def discard(root: str, iteration: int) -> None:
    """Remove the partial of a save that failed (the previous latest stays as it was)."""
    shutil.rmtree(iter_dir(root, iteration) + ".partial", ignore_errors=True)


def publish(root: str, iteration: int, keep_last: int | None = None) -> str:
    """Move the written ``iter_N.partial`` into place, track it, then apply retention."""
    final = iter_dir(root, iteration)
    old = final + ".old"
    if os.path.isdir(old) and os.path.isdir(final):
        shutil.rmtree(old)  # a complete iter_N exists: the .old of an earlier interrupted swap is stale
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(final + ".partial", final)
    write_tracker(root, iteration)
    shutil.rmtree(old, ignore_errors=True)
    if keep_last:
        prune(root, keep_last)
    return final


def prune(root: str, keep_last: int) -> list[int]:
    """Remove all but the ``keep_last`` highest iterations, never the tracked or the newest one."""
    iters = saved_iterations(root)
    keep = set(iters[-keep_last:]) | ({read_tracker(root)} - {None})
    removed = [it for it in iters if it not in keep]
    for it in removed:
        shutil.rmtree(iter_dir(root, it), ignore_errors=True)
    return removed
