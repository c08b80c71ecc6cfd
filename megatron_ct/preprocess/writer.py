"""Write megatron-core ``IndexedDataset`` files so a crash never looks finished.

Each output is built by megatron-core's own ``IndexedDatasetBuilder`` (so its
``IndexedDataset`` reader, and therefore upstream Megatron-LM, reads it) but
under temporary names; ``commit`` renames all ``.bin`` files and then all
``.idx`` files. ``IndexedDataset.exists`` and the readers look for the ``.idx``,
so until the last rename an interrupted run leaves no prefix that opens.
"""

from __future__ import annotations

import os
import warnings
from types import TracebackType

import numpy as np

TMP_SUFFIX = ".tmp"


def _indexed_dataset_module():
    # Imported on first use: megatron.core takes seconds to import, and its
    # package import warns about optional GPU extras a tokenization job never
    # uses; keep both away from the CLI's fail-fast checks and output.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """Token id dtype megatron-core picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return _indexed_dataset_module().DType.optimal_dtype(vocab_size)


class IndexedDatasetWriter:
    """One ``IndexedDatasetBuilder`` per output prefix, published atomically.

    Use as a context manager: leaving the block by an exception (including
    KeyboardInterrupt) before ``commit`` deletes the temporary files.
    """

    def __init__(self, prefixes: dict[str, str], dtype: type[np.number]) -> None:
        """``prefixes`` maps an output key to its path prefix (no ``.bin``/``.idx``)."""
        builder_cls = _indexed_dataset_module().IndexedDatasetBuilder
        self.prefixes = dict(prefixes)
        self.dtype = dtype
        self._builders = {}
        self._committed = False
        try:
            for key, prefix in self.prefixes.items():
                self._builders[key] = builder_cls(prefix + ".bin" + TMP_SUFFIX, dtype=dtype)
        except BaseException:
            self.abort()  # do not leave the builders opened so far behind
            raise

    def add_documents(self, key: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as concatenated ids and per-document lengths."""
        builder = self._builders[key]
        start = 0
        for length in lengths.tolist():
            # One sequence per document, as Megatron-LM's preprocess_data writes it.
            builder.add_document(tokens[start : start + length], [length])
            start += length

    def commit(self) -> None:
        """Write the indexes and move every file to its final name, ``.idx`` last."""
        for key, builder in self._builders.items():
            builder.finalize(self.prefixes[key] + ".idx" + TMP_SUFFIX)
        # A leftover index from an earlier run would pair with the new .bin
        # between the two renames below; drop it first.
        for prefix in self.prefixes.values():
            if os.path.exists(prefix + ".idx"):
                os.remove(prefix + ".idx")
        for prefix in self.prefixes.values():
            os.replace(prefix + ".bin" + TMP_SUFFIX, prefix + ".bin")
        for prefix in self.prefixes.values():
            os.replace(prefix + ".idx" + TMP_SUFFIX, prefix + ".idx")
        self._committed = True

    def abort(self) -> None:
        """Close and delete the temporary files."""
        for key, builder in self._builders.items():
            builder.data_file.close()
            for ext in (".bin", ".idx"):
                path = self.prefixes[key] + ext + TMP_SUFFIX
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
