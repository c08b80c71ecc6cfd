"""The run's JSON-lines logs (metrics.jsonl, eval.jsonl, samples.jsonl): append, and reconcile on resume.

Rank 0 appends one record per line, each with the ``iteration`` it describes. A job that is
resumed from a checkpoint at iteration k may have logged past k before it died; on resume
those records are dropped (:func:`drop_records_after`, an atomic rewrite, before anything is
appended), so each file describes one consistent run whatever happened to earlier jobs.
Files open at the first record, so the rewrite never races an open handle.
"""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_ct.atomic import atomic_write

RUN_LOGS = ("metrics.jsonl", "eval.jsonl", "downstream.jsonl", "samples.jsonl", "ranks.jsonl")


class JsonlLog:
    """Append-only JSON lines at ``path`` (None: write nothing), line-buffered."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file = None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def drop_records_after(path: str, iteration: int) -> int:
    """Rewrite ``path`` without records past ``iteration`` (and without a torn last line);
    returns how many were dropped. Atomic: a kill leaves the old file or the new one."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                ok = int(json.loads(line)["iteration"]) <= iteration
            except (ValueError, KeyError, TypeError):
                ok = False  # a line cut by a kill
            if ok:
                kept.append(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
    if dropped:
        with atomic_write(path) as f:
            f.writelines(kept)
    return dropped
