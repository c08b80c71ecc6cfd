"""Input discovery, sharding and chunked reading for ``preprocess``.

Inputs, chosen by extension (or, for a directory, by what it holds):

- JSON lines ``.jsonl``/``.json`` and plain text ``.txt`` (a document per line), each
  optionally ``.gz`` or ``.zst``. Read as bytes and split on ``b"\\n"`` only: decoding
  happens per line in the workers, so one undecodable line is skipped instead of failing
  the whole file, and Unicode line separators inside a document do not split it.
- Parquet ``.parquet``, streamed one row group at a time (pyarrow); only the needed columns
  are read.
- A Hugging Face ``datasets`` folder written by ``save_to_disk`` (``state.json`` plus Arrow
  stream files), or a single ``.arrow`` file.

The *units* of work are whole text files, parquet row groups and Arrow files, in input
order. ``select_shard`` gives array task ``i`` of ``n`` a contiguous run of units balanced by
bytes, so the shards' outputs read in shard order hold exactly the documents of one
unsharded run, in the same order.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from megatron_ct.errors import DataError

_COMPRESSIONS = ("", ".gz", ".zst")
# Extension decides the format; ".json" is Megatron-LM's name for JSON lines.
JSON_SUFFIXES = tuple(base + c for base in (".jsonl", ".json") for c in _COMPRESSIONS)
TEXT_SUFFIXES = tuple(".txt" + c for c in _COMPRESSIONS)
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
_STRING_TYPES = ("string", "large_string", "string_view")


class PreprocessError(DataError):
    """A problem with the run's inputs or options; the message is one line for the user."""


@dataclass(frozen=True)
class InputFile:
    """One input file and how to read it."""

    path: str
    kind: str
    """``json`` (one object per line), ``text`` (one document per line), ``parquet`` or ``arrow``."""
    compression: str | None
    """``gz`` or ``zst`` for compressed line files, else None."""
    size: int
    """Bytes on disk (compressed size): the unit of the progress bar's ETA."""
    columns: dict[str, str] = field(default_factory=dict)
    """Columnar inputs: column name -> Arrow type name."""
    row_groups: tuple[tuple[int, int], ...] = ()
    """Parquet: (rows, compressed bytes) of each row group."""

    @property
    def is_json(self) -> bool:
        return self.kind == "json"

    @property
    def columnar(self) -> bool:
        return self.kind in ("parquet", "arrow")


@dataclass(frozen=True)
class Unit:
    """The smallest piece of input a shard can take: a whole file or one parquet row group."""

    file_index: int
    row_group: int | None
    size: int


@dataclass
class Chunk:
    """Consecutive lines or rows of one unit: the unit of work sent to a worker."""

    file_index: int
    first: int
    """1-based line number of ``lines[0]``, or 0-based row number of the first record, in its file."""
    bytes_done: int
    """Input bytes (of the selected units) read once this chunk is consumed."""
    lines: list[bytes] | None = None
    records: dict[str, list] | None = None
    """Columnar inputs: column -> values (str; bytes where a value is not UTF-8; None for null)."""

    @property
    def count(self) -> int:
        if self.lines is not None:
            return len(self.lines)
        return len(next(iter(self.records.values()))) if self.records else 0


def _need(module: str, path: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        pkg = {"pyarrow.parquet": "pyarrow", "pyarrow": "pyarrow"}.get(module, module)
        raise PreprocessError(f"input {path}: reading {what} needs the {pkg} package (pip install {pkg})") from None


def _parquet_file(path: str) -> InputFile:
    pq = _need("pyarrow.parquet", path, "parquet")
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a bad footer
        raise PreprocessError(f"input {path}: not a readable parquet file ({exc})") from None
    schema = meta.schema.to_arrow_schema()
    groups = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        compressed = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        groups.append((rg.num_rows, compressed))
    return InputFile(
        path=path,
        kind="parquet",
        compression=None,
        size=os.path.getsize(path),
        columns={f.name: str(f.type) for f in schema},
        row_groups=tuple(groups),
    )


def _arrow_schema(path: str):
    pa = _need("pyarrow", path, "Arrow files")
    try:
        with pa.memory_map(path) as source:
            try:
                return pa.ipc.open_stream(source).schema
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise PreprocessError(f"input {path}: not a readable Arrow file ({exc})") from None


def _arrow_file(path: str) -> InputFile:
    schema = _arrow_schema(path)
    return InputFile(
        path=path,
        kind="arrow",
        compression=None,
        size=os.path.getsize(path),
        columns={f.name: str(f.type) for f in schema},
    )


def _hf_dataset_files(directory: str) -> list[str]:
    """Arrow files of a ``datasets`` ``save_to_disk`` folder, in the dataset's order."""
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        with open(os.path.join(directory, "dataset_dict.json"), encoding="utf-8") as f:
            splits = json.load(f).get("splits", [])
        raise PreprocessError(
            f"input {directory} is a DatasetDict with splits {', '.join(splits)}; pass one split's folder, "
            f"e.g. {os.path.join(directory, splits[0] if splits else 'train')}"
        )
    with open(os.path.join(directory, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    names = [entry["filename"] for entry in state.get("_data_files", [])]
    if not names:
        raise PreprocessError(f"input {directory}: state.json lists no data files (an empty dataset?)")
    paths = [os.path.join(directory, n) for n in names]
    for path in paths:
        if not os.path.isfile(path):
            raise PreprocessError(f"input {directory}: data file {path} named in state.json is missing")
    return paths


def _is_hf_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json")
    )


def _describe(path: str) -> InputFile:
    name = path.lower()
    for suffixes, kind in ((JSON_SUFFIXES, "json"), (TEXT_SUFFIXES, "text")):
        if name.endswith(suffixes):
            compression = "gz" if name.endswith(".gz") else "zst" if name.endswith(".zst") else None
            if compression == "zst":
                _need("zstandard", path, ".zst files")
            return InputFile(path=path, kind=kind, compression=compression, size=os.path.getsize(path))
    if name.endswith(PARQUET_SUFFIXES):
        return _parquet_file(path)
    if name.endswith(ARROW_SUFFIXES):
        return _arrow_file(path)
    known = JSON_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
    raise PreprocessError(
        f"input {path}: unknown extension; expected one of {', '.join(known)} or a datasets save_to_disk folder"
    )


def resolve_inputs(patterns: list[str]) -> list[InputFile]:
    """Expand files, Hugging Face dataset folders and globs (``**`` allowed) into an ordered,
    de-duplicated file list.

    Glob matches are sorted so the output does not depend on directory order.
    Raises PreprocessError for a missing file, a glob matching no file, a plain
    directory, an unknown extension or an unreadable parquet/Arrow file: all before
    any work starts.
    """
    if not patterns:
        raise PreprocessError("no --input given")
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            hits = []
            for p in matches:
                if os.path.isfile(p):
                    hits.append(p)
                elif _is_hf_dataset(p):
                    hits.extend(_hf_dataset_files(p))
            if not hits:
                raise PreprocessError(f"input glob {pattern!r} matches no file")
            paths.extend(hits)
        elif _is_hf_dataset(pattern):
            paths.extend(_hf_dataset_files(pattern))
        elif os.path.isdir(pattern):
            raise PreprocessError(
                f"input {pattern} is a directory but not a datasets save_to_disk folder (no state.json); "
                f"pass files or a glob such as {pattern}/*.jsonl"
            )
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


def check_columns(files: list[InputFile], keys: tuple[str, ...]) -> None:
    """Every columnar input must have each key as a string column (PreprocessError naming the file)."""
    for f in files:
        if not f.columnar:
            continue
        for key in keys:
            if key not in f.columns:
                raise PreprocessError(
                    f"input {f.path}: no column {key!r}; expected --json-keys/--instruction-keys among its "
                    f"columns {', '.join(f.columns)}"
                )
            if f.columns[key] not in _STRING_TYPES:
                raise PreprocessError(f"input {f.path}: column {key!r} is {f.columns[key]}, expected a string column")


# --- sharding ----------------------------------------------------------------------------------
def units_of(files: list[InputFile]) -> list[Unit]:
    """Every unit of work in input order: whole files, parquet row groups."""
    units = []
    for i, f in enumerate(files):
        if f.kind == "parquet":
            units.extend(Unit(i, g, size) for g, (_, size) in enumerate(f.row_groups))
        else:
            units.append(Unit(i, None, f.size))
    return units


def select_shard(units: list[Unit], index: int, count: int) -> list[Unit]:
    """The contiguous run of ``units`` that shard ``index`` of ``count`` processes.

    Boundaries fall where the running byte total crosses ``k / count`` of the whole (a unit
    goes to the shard holding its midpoint), then are nudged so that every shard gets at
    least one unit. Depends only on the inputs, so every array task computes the same split.
    """
    if count == 1:
        return list(units)
    if len(units) < count:
        raise PreprocessError(
            f"--num-shards {count}: the inputs have only {len(units)} unit(s) of work (files and parquet row "
            f"groups); expected at most {len(units)} shards"
        )
    sizes = [max(u.size, 1) for u in units]  # an empty file still counts as a unit
    total = sum(sizes)
    owner = []
    before = 0
    for size in sizes:
        owner.append(min(count - 1, int((before + size / 2) * count // total)))
        before += size
    # starts[k]: first unit of shard k; strictly increasing, leaving room for the shards after.
    starts = [next((j for j, o in enumerate(owner) if o >= k), len(units)) for k in range(count)]
    starts[0] = 0
    for k in range(1, count):
        starts[k] = min(max(starts[k], starts[k - 1] + 1), len(units) - (count - k))
    ends = starts[1:] + [len(units)]
    return units[starts[index] : ends[index]]


# --- reading -----------------------------------------------------------------------------------
def _open_lines(raw, spec: InputFile):
    if spec.compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if spec.compression == "zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def _line_chunks(spec: InputFile, index: int, lines_per_chunk: int, max_bytes: int, done: int) -> Iterator[Chunk]:
    """A line file's lines in order, grouped into chunks."""
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
    if spec.compression == "zst":
        import zstandard

        errors += (zstandard.ZstdError,)
    with open(spec.path, "rb") as raw:
        stream = _open_lines(raw, spec)
        lines: list[bytes] = []
        first_line, size = 1, 0
        try:
            for line in stream:
                lines.append(line)
                size += len(line)
                if len(lines) >= lines_per_chunk or size >= max_bytes:
                    # raw.tell() is the position in the on-disk (compressed) file.
                    yield Chunk(index, first_line, done + min(raw.tell(), spec.size), lines=lines)
                    first_line += len(lines)
                    lines, size = [], 0
        except errors as exc:
            last_good = first_line + len(lines) - 1
            raise PreprocessError(f"input {spec.path}: cannot read past line {last_good} ({exc})") from None
        if lines:
            yield Chunk(index, first_line, done + spec.size, lines=lines)


def _records(batch, columns: tuple[str, ...]) -> dict[str, list]:
    out = {}
    for name in columns:
        col = batch.column(batch.schema.get_field_index(name))
        try:
            out[name] = col.to_pylist()
        except UnicodeDecodeError:
            # Arrow does not check UTF-8 on read; hand the bytes over and let the
            # worker skip the bad values one by one, as for JSON lines.
            import pyarrow as pa

            out[name] = col.cast(pa.large_binary()).to_pylist()
    return out


def _parquet_chunks(
    spec: InputFile, index: int, group: int, columns: tuple[str, ...], rows: int, done: int, size: int
) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = sum(n for n, _ in spec.row_groups[:group])
    total = max(spec.row_groups[group][0], 1)
    read = 0
    try:
        batches = pq.ParquetFile(spec.path).iter_batches(batch_size=rows, row_groups=[group], columns=list(columns))
        for batch in batches:
            read += batch.num_rows
            yield Chunk(
                index, first + read - batch.num_rows, done + size * read // total, records=_records(batch, columns)
            )
    except (OSError, pa.ArrowException) as exc:  # a corrupt page or column chunk
        raise PreprocessError(f"input {spec.path}: cannot read row group {group} ({exc})") from None


def _arrow_batches(path: str):
    import pyarrow as pa

    with pa.memory_map(path) as source:
        try:
            reader = pa.ipc.open_stream(source)
            yield from reader
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)


def _arrow_chunks(spec: InputFile, index: int, columns: tuple[str, ...], rows: int, done: int) -> Iterator[Chunk]:
    import pyarrow as pa

    first = 0
    try:
        for batch in _arrow_batches(spec.path):
            for lo in range(0, batch.num_rows, rows):
                part = batch.slice(lo, rows)
                first += part.num_rows
                # Progress by rows is not known up front for a stream: count the file at its end.
                yield Chunk(index, first - part.num_rows, done, records=_records(part, columns))
    except (OSError, pa.ArrowException) as exc:
        raise PreprocessError(f"input {spec.path}: cannot read past row {first} ({exc})") from None


def read_chunks(
    files: list[InputFile],
    units: list[Unit],
    chunk_rows: int,
    columns: tuple[str, ...] = (),
    max_chunk_bytes: int = 4 << 20,
) -> Iterator[Chunk]:
    """Yield the units' lines or rows in order, in chunks that never span two units."""
    done = 0
    for unit in units:
        spec = files[unit.file_index]
        if spec.kind == "parquet":
            yield from _parquet_chunks(spec, unit.file_index, unit.row_group, columns, chunk_rows, done, unit.size)
        elif spec.kind == "arrow":
            yield from _arrow_chunks(spec, unit.file_index, columns, chunk_rows, done)
        else:
            yield from _line_chunks(spec, unit.file_index, chunk_rows, max_chunk_bytes, done)
        done += unit.size
