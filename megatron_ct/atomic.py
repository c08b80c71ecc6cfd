"""Files that are either absent, the old version or complete: never empty or cut short.

A process can be killed at any instruction (SIGKILL from SLURM after KillWait, a lost node,
the out-of-memory killer); a file it was writing in place is then empty or partial, and its
reader (a script, a resume) takes garbage for a value. :func:`atomic_write` writes a temporary
file in the same directory, flushes and fsyncs it, and renames it over the final name
(``os.replace``, atomic on POSIX within one file system). The temporary name is hidden
(``.<name>.<pid>.tmp``), so globs over the final names (``rank*``, ``iter*_rank*.txt``) never
see it, and two processes writing the same name do not share one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO


def temporary_name(path: str) -> str:
    """The hidden name in ``path``'s directory that :func:`atomic_write` writes first."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing; on a normal exit of the ``with`` block publish it as
    ``path``, on an exception remove it (``path`` keeps what it had). The file object has a
    real descriptor (``faulthandler`` can write to it)."""
    path = os.fspath(path)
    tmp = temporary_name(path)
    f = open(tmp, mode, encoding=None if "b" in mode else encoding)  # noqa: SIM115 (closed below)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` as the whole content of ``path``, through :func:`atomic_write`."""
    with atomic_write(path) as f:
        f.write(text)
