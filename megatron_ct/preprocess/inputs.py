"""Input discovery and chunked byte-level reading for ``preprocess``.

Files are read as bytes and split on ``b"\\n"`` only: decoding happens per line
in the workers, so one undecodable line is skipped instead of failing the
whole file, and Unicode line separators inside a document (U+2028, form feed,
...) do not split it the way ``str.splitlines`` would.
"""

from __future__ import annotations

import glob
import gzip
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

# Extension decides the format; ".json" is Megatron-LM's name for JSON lines.
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")


class PreprocessError(Exception):
    """A problem with the run's inputs or options; the message is one line for the user."""


@dataclass(frozen=True)
class InputFile:
    """One input file and how to read it."""

    path: str
    is_json: bool
    """JSON lines (one object per line) vs plain text (one document per line)."""
    gzipped: bool
    size: int
    """Bytes on disk (compressed size for .gz): the unit of the progress bar's ETA."""


@dataclass
class Chunk:
    """A run of consecutive lines of one file: the unit of work sent to a worker."""

    file_index: int
    first_line: int
    """1-based line number of ``lines[0]`` in its file, for warnings."""
    lines: list[bytes]
    bytes_done: int
    """Input bytes (over all files) read once this chunk is consumed."""


def _describe(path: str) -> InputFile:
    name = path.lower()
    if name.endswith(JSON_SUFFIXES):
        is_json = True
    elif name.endswith(TEXT_SUFFIXES):
        is_json = False
    else:
        raise PreprocessError(
            f"input {path}: unknown extension; expected one of {', '.join(JSON_SUFFIXES + TEXT_SUFFIXES)}"
        )
    return InputFile(path=path, is_json=is_json, gzipped=name.endswith(".gz"), size=os.path.getsize(path))


def resolve_inputs(patterns: list[str]) -> list[InputFile]:
    """Expand files and globs (``**`` allowed) into an ordered, de-duplicated file list.

    Glob matches are sorted so the output does not depend on directory order.
    Raises PreprocessError for a missing file, a glob matching no file, a
    directory, or an unknown extension: all before any work starts.
    """
    if not patterns:
        raise PreprocessError("no --input given")
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(f"input glob {pattern!r} matches no file")
            paths.extend(matches)
        elif os.path.isdir(pattern):
            raise PreprocessError(f"input {pattern} is a directory; pass files or a glob such as {pattern}/*.jsonl")
        elif not os.path.isfile(pattern):
            raise PreprocessError(f"input file {pattern} does not exist")
        else:
            paths.append(pattern)
    seen: set[str] = set()
    unique = []
    for path in paths:
        key = os.path.realpath(path)
        if key not in seen:  # a file named twice (e.g. by two globs) is read once
            seen.add(key)
            unique.append(path)
    return [_describe(p) for p in unique]


def read_chunks(files: list[InputFile], lines_per_chunk: int, max_chunk_bytes: int = 4 << 20) -> Iterator[Chunk]:
    """Yield each file's lines in order, grouped into chunks that never span two files."""
    done_before = 0
    for index, spec in enumerate(files):
        with open(spec.path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if spec.gzipped else raw
            lines: list[bytes] = []
            first_line, size = 1, 0
            try:
                for line in stream:
                    lines.append(line)
                    size += len(line)
                    if len(lines) >= lines_per_chunk or size >= max_chunk_bytes:
                        # raw.tell() is the position in the on-disk (compressed) file.
                        yield Chunk(index, first_line, lines, done_before + raw.tell())
                        first_line += len(lines)
                        lines, size = [], 0
            except (EOFError, OSError, zlib.error) as exc:
                last_good = first_line + len(lines) - 1
                msg = f"input {spec.path}: cannot read past line {last_good} ({exc})"
                raise PreprocessError(msg) from None
            if lines:
                yield Chunk(index, first_line, lines, done_before + spec.size)
        done_before += spec.size
