"""Write IndexedDataset ``.bin``/``.idx`` pairs (and their metadata sidecar) so a crash never looks finished.

The bytes are those of megatron-core's ``IndexedDatasetBuilder`` (one sequence per document;
tested byte for byte against it), written through the format owner
:mod:`megatron_ct.data.indexed` without importing megatron-core. Tokens go to the ``.bin``
as whole chunks; lengths stay in memory (4 bytes per document) until ``commit`` writes the
``.idx`` and the ``.meta.json`` sidecar.

Everything is written under temporary names; ``commit`` removes any older ``.idx`` and
sidecar of the prefix, renames the ``.bin``, the sidecar and then the ``.idx``. Readers look
for the ``.idx``, so until the last rename an interrupted run leaves no prefix that opens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import TracebackType
from typing import BinaryIO

import numpy as np

from megatron_ct.data.indexed import (
    DatasetMeta,
    IndexedData,
    meta_path,
    optimal_dtype,
    write_index,
    write_meta,
)
from megatron_ct.errors import DataError

__all__ = ["IndexedDatasetWriter", "optimal_dtype", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"


@dataclass
class _Output:
    """One output prefix being written."""

    prefix: str
    file: BinaryIO
    lengths: list[np.ndarray] = field(default_factory=list)  # int32 chunks, [documents] each
    doc_ends: list[np.ndarray] = field(default_factory=list)  # int64 chunks: sequences so far at each document end
    sequences: int = 0
    tokens: int = 0
    max_id: int = -1
    unknown: int | None = 0

    def paths(self) -> dict[str, str]:
        tmp = {ext: self.prefix + ext + TMP_SUFFIX for ext in (".bin", ".idx")}
        tmp["meta"] = meta_path(self.prefix) + TMP_SUFFIX
        return tmp


class IndexedDatasetWriter:
    """One output per key (``{key: prefix}``), published atomically by ``commit``.

    Use as a context manager: leaving the block by an exception (including
    KeyboardInterrupt) before ``commit`` deletes the temporary files.
    """

    def __init__(self, prefixes: dict[str, str], dtype: np.dtype | type, tokenizer: dict | None = None) -> None:
        """``prefixes`` maps an output key to its path prefix (no ``.bin``/``.idx``); ``tokenizer`` is the
        :func:`~megatron_ct.data.indexed.tokenizer_fingerprint` recorded in every sidecar (None: unknown)."""
        self.prefixes = dict(prefixes)
        self.dtype = np.dtype(dtype)
        self.tokenizer = tokenizer
        self._outputs: dict[str, _Output] = {}
        self._committed = False
        try:
            for key, prefix in self.prefixes.items():
                self._outputs[key] = _Output(prefix, open(prefix + ".bin" + TMP_SUFFIX, "wb"))
        except BaseException:
            self.abort()  # do not leave the files opened so far behind
            raise

    def add_documents(self, key: str, tokens: np.ndarray, lengths: np.ndarray, unknown: int | None = 0) -> None:
        """Append documents given as concatenated ids [sum(lengths)] and per-document lengths
        [documents]; ``unknown`` counts their unknown ids (None: not counted)."""
        out = self._outputs[key]
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        out.file.write(memoryview(tokens).cast("B"))
        n = len(lengths)
        out.lengths.append(np.asarray(lengths, dtype=np.int32))
        # One sequence per document, as Megatron-LM's preprocess_data writes it.
        out.doc_ends.append(np.arange(out.sequences + 1, out.sequences + n + 1, dtype=np.int64))
        out.sequences += n
        out.tokens += len(tokens)
        if len(tokens):
            out.max_id = max(out.max_id, int(tokens.max()))
        out.unknown = None if out.unknown is None or unknown is None else out.unknown + unknown

    def add_dataset(self, key: str, data: IndexedData) -> None:
        """Append a whole existing dataset (its documents keep their sequences)."""
        out = self._outputs[key]
        if data.dtype != self.dtype:
            raise DataError(
                f"{data.idx_path}: tokens are {data.dtype.name}, expected {self.dtype.name} like the others"
            )
        meta = data.meta
        top = -1
        for block in data.iter_token_blocks():
            out.file.write(memoryview(np.ascontiguousarray(block)).cast("B"))
            if meta is None and len(block):
                top = max(top, int(block.max()))  # no sidecar: the copy is the scan
        out.lengths.append(np.array(data.sequence_lengths, dtype=np.int32))
        out.doc_ends.append(out.sequences + np.asarray(data.document_indices[1:], dtype=np.int64))
        out.sequences += len(data)
        out.tokens += data.num_tokens
        out.max_id = max(out.max_id, meta.max_token_id if meta is not None else top)
        known = meta is not None and meta.unknown_ids is not None and out.unknown is not None
        out.unknown = out.unknown + meta.unknown_ids if known else None

    def commit(self, extra: dict | None = None) -> dict[str, DatasetMeta]:
        """Write the indexes and sidecars and move every file to its final name, ``.idx`` last.
        ``extra`` is provenance stored in each sidecar. Returns the sidecars by key."""
        metas = {}
        for key, out in self._outputs.items():
            out.file.close()
            tmp = out.paths()
            lengths = np.concatenate(out.lengths) if out.lengths else np.zeros(0, np.int32)
            doc_index = np.concatenate([np.zeros(1, np.int64), *out.doc_ends])
            idx_sha = write_index(tmp[".idx"], self.dtype, lengths, doc_index)
            metas[key] = DatasetMeta(
                documents=len(doc_index) - 1,
                sequences=out.sequences,
                tokens=out.tokens,
                max_token_id=out.max_id,
                unknown_ids=out.unknown,
                tokenizer=self.tokenizer,
                dtype=self.dtype.name,
                idx_sha256=idx_sha,
                bin_bytes=out.tokens * self.dtype.itemsize,
                extra=dict(extra or {}),
            )
            write_meta(tmp["meta"], metas[key])
        # A leftover index (or sidecar) from an earlier run would pair with the new .bin
        # between the renames below; drop them first.
        for prefix in self.prefixes.values():
            for path in (prefix + ".idx", meta_path(prefix)):
                if os.path.exists(path):
                    os.remove(path)
        for out in self._outputs.values():
            os.replace(out.paths()[".bin"], out.prefix + ".bin")
            os.replace(out.paths()["meta"], meta_path(out.prefix))
        for out in self._outputs.values():
            os.replace(out.paths()[".idx"], out.prefix + ".idx")
        self._committed = True
        return metas

    def abort(self) -> None:
        """Close and delete the temporary files."""
        for out in self._outputs.values():
            out.file.close()
            for path in out.paths().values():
                if os.path.exists(path):
                    os.remove(path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._committed:
            self.abort()
