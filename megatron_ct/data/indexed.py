"""The megatron-core ``IndexedDataset`` file format (``.bin``/``.idx``), read and checked here,
and the metadata sidecar (``.meta.json``) that our preprocessing writes beside it.

This module is the one owner of the format: the trainer reads datasets through
:func:`open_indexed`, and the offline writer (``megatron_ct/preprocess/writer.py``) writes
with :func:`write_index` and :func:`write_meta`, so neither imports megatron-core.

``{prefix}.idx`` (little-endian), as megatron-core's ``_IndexWriter`` lays it out::

    9 bytes   b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code of the tokens (DTYPE_CODES)
    u64       S, number of sequences
    u64       D, number of document indices (documents + 1)
    i32[S]    sequence lengths, in tokens
    i64[S]    sequence pointers, byte offsets into the .bin
    i64[D]    document indices: sequence index where each document starts, then S

``{prefix}.bin`` is every sequence's tokens back to back. Our preprocessing writes one
sequence per document; upstream's ``--split-sentences`` writes several.

Opening a dataset validates it from metadata only (no pass over the tokens): header, version,
dtype code, ``.idx`` size, at least one document, document indices and pointers consistent
with the lengths, and the ``.bin`` exactly ``sum(lengths) * itemsize`` bytes. A fault is a
one-line :class:`DataError` naming the file and what was expected, at start-up instead of
an index error days into a run.

Every opened dataset has a :attr:`IndexedData.fingerprint` (sizes, mtime_ns and SHA-256 of
the ``.idx``) that changes whenever either file's content does; caches and resume checks are
keyed by it.

The sidecar records what a trainer would otherwise scan the ``.bin`` for (largest token id),
plus the unknown-id count and the tokenizer's fingerprint. It is trusted only while it
describes the files beside it (same ``.idx`` hash and ``.bin`` size); datasets written by
upstream tools have none and still work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from megatron_ct.errors import DataError

log = logging.getLogger("megatron_ct")

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
"""megatron-core's ``DType`` enum: code in the ``.idx`` -> token dtype."""
_PREAMBLE = struct.Struct("<9sQBQQ")  # header, version, dtype code, sequences, document indices
PREAMBLE_BYTES = _PREAMBLE.size  # 34

META_SUFFIX = ".meta.json"
META_FORMAT = "megatron-ct indexed dataset metadata"
META_VERSION = 1

_BLOCK = 1 << 20  # elements per block when a pass over an index array would allocate too much


def dtype_code(dtype: np.dtype | type) -> int:
    """The ``.idx`` code of a token dtype."""
    dtype = np.dtype(dtype)
    for code, d in DTYPE_CODES.items():
        if d == dtype:
            return code
    raise ValueError(f"token dtype {dtype} has no IndexedDataset code; expected one of {list(DTYPE_CODES.values())}")


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Token dtype for a vocabulary: uint16 below 65500 ids, else int32 (megatron-core's choice)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, identity: tuple[int, ...]) -> str:
    """``sha256_file`` memoized by the file's identity (device, inode, size, mtime_ns, ctime_ns):
    the trainer's start-up checks and its data source open each dataset once each. Any write
    or rename changes ctime, so a changed file is always hashed again."""
    return sha256_file(path)


# --- writing -----------------------------------------------------------------------------------
def write_index(path: str, dtype: np.dtype | type, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> str:
    """Write an ``.idx`` byte-identical to megatron-core's ``IndexedDatasetBuilder``; return its SHA-256.

    ``sequence_lengths`` [S] in tokens; ``document_indices`` [D], starting at 0 and ending at S.
    """
    dtype = np.dtype(dtype)
    lengths = np.ascontiguousarray(sequence_lengths, dtype=np.int32)
    docs = np.ascontiguousarray(document_indices, dtype=np.int64)
    digest = hashlib.sha256()
    with open(path, "wb") as f:

        def put(data: bytes | memoryview) -> None:
            f.write(data)
            digest.update(data)

        put(_PREAMBLE.pack(INDEX_HEADER, INDEX_VERSION, dtype_code(dtype), len(lengths), len(docs)))
        put(memoryview(lengths).cast("B"))
        # Pointers are the running byte offset of each sequence; built block by block so a
        # corpus of 10^9 sequences does not need another 8 GB array at once.
        start = 0
        for lo in range(0, len(lengths), _BLOCK):
            block = lengths[lo : lo + _BLOCK].astype(np.int64) * dtype.itemsize  # [block] bytes
            ends = np.cumsum(block)
            pointers = np.empty_like(ends)
            pointers[0] = start
            pointers[1:] = start + ends[:-1]
            start += int(ends[-1])
            put(memoryview(pointers).cast("B"))
        put(memoryview(docs).cast("B"))
    return digest.hexdigest()


# --- tokenizer and metadata ----------------------------------------------------------------------
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
TOKENIZER_PROBE = (
    "The quick brown fox jumps over the lazy dog. 1234567890, 3.14159; e-mail: a.b@c.org\n"
    "这家酒店的服务很好，我们下次还会再来。机器学习和自然语言处理。\n"
    "def main(argv):\n\treturn {'key': [1, 2, 3]}  # comment\n"
    "Émile a mangé 🦙 à Zürich; Привет мир; こんにちは世界"
)
"""Mixed text whose ids identify a tokenizer's behaviour: a SentencePiece ``.model`` and its
``tokenizer.json`` conversion agree on it, different vocabularies do not."""


def tokenizer_fingerprint(path: str, tokenizer) -> dict:
    """What identifies the tokenization of a dataset: vocabulary size, the EOD id appended after
    documents, a hash of the ids of ``TOKENIZER_PROBE`` (behaviour), and for people the
    tokenizer file's SHA-256 (a SentencePiece ``.model``, or the ``tokenizer.json`` of a directory)."""
    file = path
    if os.path.isdir(path):
        file = next((os.path.join(path, n) for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))), "")
    probe = np.asarray(tokenizer.encode(TOKENIZER_PROBE), dtype=np.int64)
    return {
        "file": os.path.basename(file) if file else None,
        "sha256": sha256_file(file) if file else None,
        "vocab_size": int(tokenizer.vocab_size),
        "eod_id": int(tokenizer.eod_id),
        "unk_id": getattr(tokenizer, "unk_id", None),
        "probe": hashlib.sha256(probe.tobytes()).hexdigest()[:16],
    }


def describe_tokenizer(fp: dict) -> str:
    sha = (fp.get("sha256") or "?")[:12]
    return f"{fp.get('file')} sha256 {sha}, vocab {fp.get('vocab_size')}, EOD {fp.get('eod_id')}"


@dataclass
class DatasetMeta:
    """The sidecar ``{prefix}.meta.json``: facts about a dataset that would need a pass over it."""

    documents: int
    """Documents (document indices - 1)."""
    sequences: int
    tokens: int
    """Token ids in the ``.bin``, EOD included."""
    max_token_id: int
    """Largest id in the ``.bin`` (-1 when it holds none)."""
    unknown_ids: int | None
    """Ids equal to the tokenizer's unknown id (the appended EOD never counts); None: not known."""
    tokenizer: dict | None
    """:func:`tokenizer_fingerprint` of the tokenizer that wrote the ids; None: not known."""
    dtype: str
    idx_sha256: str
    """SHA-256 of the ``.idx`` the sidecar describes: a sidecar beside other files is ignored."""
    bin_bytes: int
    created_by: str = "megatron-ct"
    extra: dict = field(default_factory=dict)
    """Free-form provenance (inputs, shard) for people; never read by the trainer."""

    @property
    def unknown_id_share(self) -> float | None:
        if self.unknown_ids is None:
            return None
        return self.unknown_ids / self.tokens if self.tokens else 0.0


def meta_path(prefix: str) -> str:
    return prefix + META_SUFFIX


def write_meta(path: str, meta: DatasetMeta) -> None:
    """Write a sidecar to ``path`` (the caller renames it into place)."""
    record = {"format": META_FORMAT, "version": META_VERSION, **asdict(meta)}
    record["unknown_id_share"] = meta.unknown_id_share
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_meta(prefix: str) -> DatasetMeta | None:
    """The sidecar of ``prefix``, or None when there is none or it cannot be read (logged)."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("format") != META_FORMAT or raw.get("version") != META_VERSION:
            raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
        names = DatasetMeta.__dataclass_fields__
        return DatasetMeta(**{k: v for k, v in raw.items() if k in names})
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s: unreadable dataset metadata (%s); the dataset is used without it", path, exc)
        return None


def _same_tokenizer(a: dict, b: dict) -> bool:
    # Same ids for the same text: the probe decides when both have it (a .model and its
    # tokenizer.json conversion agree), else the tokenizer file itself.
    identity = "probe" if a.get("probe") and b.get("probe") else "sha256"
    return all(a.get(k) == b.get(k) for k in ("vocab_size", "eod_id", identity))


def check_same_tokenizer(metas: dict[str, DatasetMeta | None]) -> None:
    """Refuse datasets of one run that were tokenized with different tokenizers.

    ``metas`` maps a label (dataset name and prefix) to its sidecar; datasets without one
    (upstream-written) are not compared. Raises DataError naming two that differ.
    """
    first: tuple[str, dict] | None = None
    for label, meta in metas.items():
        if meta is None or not meta.tokenizer:
            continue
        fp = meta.tokenizer
        if first is None:
            first = (label, fp)
        elif not _same_tokenizer(fp, first[1]):
            raise DataError(
                f"{label}: tokenized with {describe_tokenizer(meta.tokenizer)}, but {first[0]} with "
                f"{describe_tokenizer(metas[first[0]].tokenizer)}; expected every dataset of a run "
                "tokenized with one tokenizer (re-run tools/preprocess_data.py with the model's tokenizer)"
            )


# --- reading and validation ----------------------------------------------------------------------
class IndexedData:
    """One validated ``.bin``/``.idx`` pair, memory-mapped.

    ``len()`` and ``sequence_lengths`` count sequences (one per document in our outputs);
    ``get`` reads a sequence or part of it.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.idx_path, self.bin_path = prefix + ".idx", prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DataError(f"{path}: missing; expected the .bin/.idx pair of tools/preprocess_data.py")
        idx_stat, bin_stat = os.stat(self.idx_path), os.stat(self.bin_path)
        self._read_index(idx_stat.st_size)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        expected = self.num_tokens * self.dtype.itemsize
        if bin_stat.st_size != expected:
            raise DataError(
                f"{self.bin_path}: {bin_stat.st_size} bytes, expected {expected} ({self.num_tokens} "
                f"{self.dtype.name} tokens per {self.idx_path}); truncated, or the .idx belongs to another dataset"
            )
        identity = (idx_stat.st_dev, idx_stat.st_ino, idx_stat.st_size, idx_stat.st_mtime_ns, idx_stat.st_ctime_ns)
        self.idx_sha256 = _sha256_of(os.path.realpath(self.idx_path), identity)
        self.fingerprint = hashlib.sha256(
            json.dumps(
                [self.idx_sha256, idx_stat.st_size, bin_stat.st_size, idx_stat.st_mtime_ns, bin_stat.st_mtime_ns]
            ).encode()
        ).hexdigest()[:16]
        """Changes whenever either file's content (or mtime) does."""
        self.meta = read_meta(prefix)
        if self.meta is not None and (self.meta.idx_sha256 != self.idx_sha256 or self.meta.bin_bytes != expected):
            log.warning(
                "%s: describes other files than %s.bin/.idx (re-tokenized since?); ignoring it",
                meta_path(prefix),
                prefix,
            )
            self.meta = None
        self._tokens: np.ndarray | None = None

    def _read_index(self, size: int) -> None:
        path = self.idx_path
        if size < PREAMBLE_BYTES:
            what = "empty" if size == 0 else f"{size} bytes"
            raise DataError(f"{path}: {what}, expected an IndexedDataset index of at least {PREAMBLE_BYTES} bytes")
        with open(path, "rb") as f:
            header, version, code, n_seq, n_doc = _PREAMBLE.unpack(f.read(PREAMBLE_BYTES))
        if header != INDEX_HEADER:
            raise DataError(f"{path}: header {header!r}, expected {INDEX_HEADER!r} (a megatron-core IndexedDataset)")
        if version != INDEX_VERSION:
            raise DataError(f"{path}: index version {version}, expected {INDEX_VERSION}")
        if code not in DTYPE_CODES:
            raise DataError(f"{path}: token dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
        self.dtype = DTYPE_CODES[code]
        body = n_seq * (4 + 8) + n_doc * 8
        # A multimodal index has one int8 mode per sequence after the document indices.
        if size not in (PREAMBLE_BYTES + body, PREAMBLE_BYTES + body + n_seq):
            raise DataError(
                f"{path}: {size} bytes, expected {PREAMBLE_BYTES + body} for {n_seq} sequences and "
                f"{n_doc} document indices (truncated or corrupt)"
            )
        if n_seq == 0 or n_doc < 2:
            raise DataError(f"{path}: holds no document, expected at least one (an empty preprocessing output?)")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(mm, np.int32, n_seq, PREAMBLE_BYTES)  # [S]
        self.sequence_pointers = np.frombuffer(mm, np.int64, n_seq, PREAMBLE_BYTES + 4 * n_seq)  # [S] bytes
        self.document_indices = np.frombuffer(mm, np.int64, n_doc, PREAMBLE_BYTES + 12 * n_seq)  # [D]
        docs = self.document_indices
        ascending = True
        for lo in range(0, n_doc - 1, _BLOCK):  # block-wise: no D-sized temporaries
            hi = min(lo + _BLOCK, n_doc - 1)
            ascending &= not np.any(docs[lo + 1 : hi + 1] < docs[lo:hi])
        if docs[0] != 0 or docs[-1] != n_seq or not ascending:
            raise DataError(f"{path}: document indices are not ascending from 0 to {n_seq} (corrupt index)")
        self._check_pointers()

    def _check_pointers(self) -> None:
        """Pointers must be the running byte offsets of the lengths (block-wise: no S-sized temporaries)."""
        lengths, pointers, size = self.sequence_lengths, self.sequence_pointers, self.dtype.itemsize
        offset = 0
        for lo in range(0, len(lengths), _BLOCK):
            block = lengths[lo : lo + _BLOCK].astype(np.int64)
            if block.min() < 0:
                raise DataError(f"{self.idx_path}: negative sequence length (corrupt index)")
            ends = offset + np.cumsum(block * size)
            expected = np.concatenate([[offset], ends[:-1]])
            if not np.array_equal(pointers[lo : lo + _BLOCK], expected):
                raise DataError(f"{self.idx_path}: sequence pointers disagree with the lengths (corrupt index)")
            offset = int(ends[-1])

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the ``.bin`` [num_tokens], memory-mapped on first use."""
        if self._tokens is None:
            if self.num_tokens == 0:
                self._tokens = np.zeros(0, dtype=self.dtype)
            else:
                self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        return self._tokens

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (a view of the mapping)."""
        start = int(self.sequence_pointers[idx]) // self.dtype.itemsize + offset
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        return self.tokens[start : start + length]

    def iter_token_blocks(self, block_tokens: int = 1 << 24) -> Iterable[np.ndarray]:
        """The ``.bin`` in blocks of at most ``block_tokens`` (a merge or a scan without one huge read)."""
        for lo in range(0, self.num_tokens, block_tokens):
            yield self.tokens[lo : lo + block_tokens]


def _make_room_for_files(margin: int = 64) -> None:
    """Each open dataset holds two memory maps (one file descriptor each); a glob over the
    thousand shards of an array job would pass the usual soft limit of 1024. Raise the soft
    limit to the hard one when it comes near."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= hard != resource.RLIM_INFINITY:
            return
        if len(os.listdir("/proc/self/fd")) + margin >= soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("raised the open-file limit from %d to %d for the datasets' memory maps", soft, hard)
    except (ImportError, OSError, ValueError):
        pass  # not Linux, or not allowed: opening fails later with the usual message


def open_indexed(prefix: str) -> IndexedData:
    """Open and validate ``{prefix}.bin``/``.idx`` (metadata only); DataError naming the file if unusable."""
    _make_room_for_files()
    return IndexedData(prefix)
