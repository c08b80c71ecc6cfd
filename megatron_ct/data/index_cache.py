"""On-disk cache of per-dataset index arrays (shuffled document orders, packing boundaries).

Building the index of one epoch of a dataset is a permutation and a cumulative sum over its
documents (plus a greedy packing pass for ``by_source``): cheap for one small dataset, but a
blend of 200 large ones would spend minutes at every start. Each array is saved once as
``{dir}/{dataset}-{key}-{kind}.npy`` and memory-mapped afterwards. The key hashes everything
the array depends on (format version, the files' content fingerprints from
:mod:`megatron_ct.data.indexed`: sizes, mtimes and the ``.idx`` hash; document range, seed,
epoch, sequence length), so a changed input, even re-tokenized into the same prefix with the
same size, never reads a stale index.

Writes go to a temporary name and are renamed into place, so ranks that build the same
array at the same time (or a run killed mid-write) never leave a torn file. A directory
that cannot be written is reported once and the arrays are kept in memory only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from megatron_ct.atomic import atomic_write

log = logging.getLogger("megatron_ct")

INDEX_VERSION = 2  # 2: keyed by content fingerprints (1 used path and size)
T = TypeVar("T")


def cache_key(parts: dict) -> str:
    """Stable 16-hex-digit hash of a JSON-serialisable description."""
    blob = json.dumps({"version": INDEX_VERSION, **parts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class IndexCache:
    """Load-or-build for named numpy arrays.

    ``directory`` (``data.index_cache_dir``) holds every dataset's arrays; None puts each
    dataset's arrays in ``ct_index_cache/`` next to its first prefix. ``enabled=False`` keeps
    everything in memory.
    """

    def __init__(self, directory: str | None = None, enabled: bool = True) -> None:
        self.directory = directory
        self.enabled = enabled
        self._unwritable_reported: set[str] = set()
        self.built = 0  # arrays computed by this process (tests and logs read these)
        self.loaded = 0  # arrays read back from disk

    def _path(self, next_to: str, dataset: str, key: str, kind: str) -> str | None:
        if not self.enabled:
            return None
        directory = self.directory or os.path.join(os.path.dirname(os.path.abspath(next_to)), "ct_index_cache")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)
        return os.path.join(directory, f"{safe}-{key}-{kind}.npy")

    def get(self, next_to: str, dataset: str, key: str, kind: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        """The array ``kind`` of ``dataset`` under ``key``: from disk, or built and saved.
        ``next_to`` is the dataset's first prefix (locates the default cache directory)."""
        path = self._path(next_to, dataset, key, kind)
        if path is not None and os.path.isfile(path):
            try:
                arr = np.load(path, mmap_mode="r")
                self.loaded += 1
                return arr
            except (OSError, ValueError) as exc:  # a truncated file from another tool: rebuild it
                log.warning("index cache %s unreadable (%s); rebuilding", path, exc)
        arr = build()
        self.built += 1
        if path is not None:
            self._save(path, arr)
        return arr

    def _save(self, path: str, arr: np.ndarray) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_write(path, "wb") as f:
                np.save(f, arr)
        except OSError as exc:
            directory = os.path.dirname(path)
            if directory not in self._unwritable_reported:
                log.warning("data index cache %s is not writable (%s); indices stay in memory", directory, exc)
                self._unwritable_reported.add(directory)


def rank0_first(build: Callable[[], T]) -> T:
    """Run ``build`` on global rank 0, then (after a barrier) on the others, so that they find
    what rank 0 cached instead of all computing it. Collective when distributed.

    An expected failure on rank 0 (a :class:`~megatron_ct.errors.CTError`, e.g. a corrupt
    dataset) still reaches the barrier before it is raised, so the other ranks are not left
    waiting: they run ``build`` themselves and meet the same error.
    """
    import torch.distributed as dist

    from megatron_ct.errors import CTError

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        return build()
    if dist.get_rank() == 0:
        try:
            result = build()
        except CTError:
            dist.barrier()
            raise
        dist.barrier()
        return result
    dist.barrier()
    return build()
