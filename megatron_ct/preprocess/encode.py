"""Worker side of ``preprocess``: raw lines or column values -> documents -> token ids.

Runs in worker processes, so everything it needs travels in a small picklable
``EncodeSpec`` and the tokenizer is loaded once per worker by path. JSON lines are
parsed with orjson when it is installed (straight from bytes); a line orjson refuses
goes through the standard library, which decides why it is skipped.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from megatron_ct.preprocess.inputs import Chunk
from megatron_ct.tokenizer import Tokenizer, load_tokenizer

try:
    import orjson
except ImportError:  # optional speed-up; the standard library parses the same documents
    orjson = None

SKIP_REASONS = ("invalid_utf8", "invalid_json", "missing_key", "not_string", "empty")
"""Why a line can be skipped; summary and warnings use these names."""

INSTRUCTION_KEY = "instruction"
"""Output key (``{prefix}_instruction_document``) of the instruction mode."""


@dataclass(frozen=True)
class EncodeSpec:
    """What a worker needs to turn lines into token ids."""

    tokenizer_path: str
    json_keys: tuple[str, ...]
    instruction_keys: tuple[str, str] | None
    """(instruction, response) JSON keys; the document becomes ``f"{instruction}\\n{response}"``."""
    append_eod: bool
    dtype: str
    """NumPy dtype name of the output ids (uint16 or int32)."""

    @property
    def output_keys(self) -> tuple[str, ...]:
        return (INSTRUCTION_KEY,) if self.instruction_keys else self.json_keys

    @property
    def source_keys(self) -> tuple[str, ...]:
        return self.instruction_keys or self.json_keys


@dataclass
class EncodedChunk:
    """Token ids of one chunk's documents, per output key, ready for the writer."""

    file_index: int
    bytes_done: int
    lines: int
    tokens: dict[str, np.ndarray] = field(default_factory=dict)
    """Concatenated ids of all documents of the chunk (EOD included)."""
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-document token counts; ``tokens`` splits at their running sum."""
    characters: dict[str, int] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)
    """Ids equal to the tokenizer's unknown id (EOD not counted); empty when it has none."""
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    """(line number or row, reason, detail) of each skipped line or row."""

    @property
    def docs(self) -> int:
        return len(next(iter(self.lengths.values()))) if self.lengths else 0


class Skip(Exception):
    """A line cannot become a document; carries the reason and a short detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class ChunkEncoder:
    """Parses and tokenizes chunks; one instance per worker process."""

    def __init__(self, spec: EncodeSpec, tokenizer: Tokenizer | None = None) -> None:
        self.spec = spec
        # Workers: the main process has run the tokenizer's self-check already.
        self.tokenizer = tokenizer or load_tokenizer(spec.tokenizer_path, self_check=False)
        self.dtype = np.dtype(spec.dtype)
        self.unk_id = getattr(self.tokenizer, "unk_id", None)

    def parse(self, line: bytes, is_json: bool, first_in_file: bool) -> list[str]:
        """The document text per output key, or raise ``Skip``."""
        if is_json and orjson is not None:
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                pass  # the slow path below says why (or accepts what orjson does not: NaN, a BOM)
            else:
                return self._fields(obj, escaped=False)  # orjson rejects lone surrogates itself
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Skip("invalid_utf8", f"byte {exc.start}") from None
        if first_in_file and text.startswith("\ufeff"):
            text = text[1:]  # a UTF-8 byte-order mark is not content (and breaks json.loads)
        if not is_json:
            doc = text[:-1] if text.endswith("\n") else text
            doc = doc[:-1] if doc.endswith("\r") else doc
            if not doc or doc.isspace():  # isspace(): no copy, stops at the first letter
                raise Skip("empty")
            return [doc]
        if not text or text.isspace():
            raise Skip("empty", "blank line")
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise Skip("invalid_json", str(exc)) from None
        return self._fields(obj, escaped=b"\\u" in line)

    def _fields(self, obj, escaped: bool) -> list[str]:
        if not isinstance(obj, dict):
            raise Skip("invalid_json", f"a JSON {type(obj).__name__}, not an object")
        values = []
        for key in self.spec.source_keys:
            if key not in obj:
                raise Skip("missing_key", repr(key))
            value = obj[key]
            if not isinstance(value, str):
                raise Skip("not_string", f"{key!r} is {type(value).__name__}")
            if not value or value.isspace():
                # Skipping the whole line keeps the per-key outputs aligned by document.
                raise Skip("empty", repr(key))
            if escaped:
                # Only a JSON escape can smuggle a lone surrogate in; tokenizers reject it.
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise Skip("invalid_utf8", f"{key!r} has a lone surrogate escape") from None
            values.append(value)
        if self.spec.instruction_keys:
            return [f"{values[0]}\n{values[1]}"]
        return values

    def parse_record(self, values: list) -> list[str]:
        """The document text per output key from one row's column values, or raise ``Skip``."""
        texts = []
        for key, value in zip(self.spec.source_keys, values, strict=True):
            if value is None:
                raise Skip("missing_key", f"{key!r} is null")
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise Skip("invalid_utf8", f"{key!r} byte {exc.start}") from None
            if not value or value.isspace():
                raise Skip("empty", repr(key))
            texts.append(value)
        if self.spec.instruction_keys:
            return [f"{texts[0]}\n{texts[1]}"]
        return texts

    def __call__(self, chunk: Chunk, kind: str) -> EncodedChunk:
        out = EncodedChunk(file_index=chunk.file_index, bytes_done=chunk.bytes_done, lines=chunk.count)
        docs: list[list[str]] = []
        if chunk.records is not None:
            columns = [chunk.records[k] for k in self.spec.source_keys]
            for offset, values in enumerate(zip(*columns, strict=True)):
                try:
                    docs.append(self.parse_record(list(values)))
                except Skip as skip:
                    out.skipped.append((chunk.first + offset, skip.reason, skip.detail))
        else:
            is_json = kind == "json"
            for offset, line in enumerate(chunk.lines):
                line_no = chunk.first + offset
                try:
                    docs.append(self.parse(line, is_json, first_in_file=line_no == 1))
                except Skip as skip:
                    out.skipped.append((line_no, skip.reason, skip.detail))
        unk = self.unk_id
        for k, key in enumerate(self.spec.output_keys):
            texts = [doc[k] for doc in docs]
            ids = self.tokenizer.encode_batch(texts) if texts else []
            if unk is not None:
                out.unknown[key] = sum(doc_ids.count(unk) for doc_ids in ids)
            if self.spec.append_eod:
                for doc_ids in ids:  # fresh lists from the tokenizer: extend in place
                    doc_ids.append(self.tokenizer.eod_id)
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = chain.from_iterable(ids)
            out.tokens[key] = np.fromiter(flat, dtype=self.dtype, count=int(lengths.sum()))
            out.lengths[key] = lengths
            out.characters[key] = sum(map(len, texts))
        return out


_ENCODER: ChunkEncoder | None = None


def init_worker(spec: EncodeSpec) -> None:
    """Pool initializer: load the tokenizer once per worker process."""
    global _ENCODER
    # Ctrl-C is the main process's to handle (it tears the pool down); without
    # this every worker would print its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _ENCODER = ChunkEncoder(spec)


def encode_in_worker(chunk: Chunk, kind: str) -> EncodedChunk:
    """Pool task: encode one chunk with this worker's encoder."""
    assert _ENCODER is not None, "init_worker did not run in this process"
    return _ENCODER(chunk, kind)
