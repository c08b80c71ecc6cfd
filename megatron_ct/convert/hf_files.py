"""HF checkpoint files, one tensor in memory at a time.

Reading: safetensors (one file or sharded with ``model.safetensors.index.json``) or PyTorch
``.bin`` (one or sharded with ``pytorch_model.bin.index.json``). Safetensors headers give
every name, dtype and shape up front; a tensor's bytes are read with a plain ``readinto``
(no mmap), so the process holds only the tensors it is working on.

Writing: sharded safetensors plus ``model.safetensors.index.json``. Shapes and dtypes are
known before any data (they follow from the config), so each shard's header is written
first and tensors are appended as they are produced.

Safetensors format (public spec): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded
with spaces, then the raw little-endian tensor bytes, offsets relative to the data start.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_ct.errors import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def is_weight_file(name: str) -> bool:
    """Weights and weight indexes; everything else in an HF directory is config or tokenizer."""
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def _read_safetensors_header(path: str) -> dict[str, _Entry]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > os.path.getsize(path) - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ConversionError(
                f"{path}: tensor {name} has dtype {info['dtype']}, expected one of {', '.join(_ST_DTYPES)}"
            )
        begin, end = info["data_offsets"]
        entries[name] = _Entry(path, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + begin, 8 + n + end)
    # A truncated file is refused here, before anything is converted, not when its last tensor is read.
    size = os.path.getsize(path)
    needed = max((e.end for e in entries.values()), default=8 + n)
    if size < needed:
        raise ConversionError(f"{path}: {size} bytes, expected at least {needed} (the header's tensors); truncated")
    return entries


class HFWeights:
    """Names, shapes and dtypes of an HF checkpoint's tensors, and their data on request."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._st: dict[str, _Entry] = {}
        self._bin: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
        files = self._weight_files(directory)
        for path in files:
            if path.endswith(".safetensors"):
                self._st.update(_read_safetensors_header(path))
            else:
                sd = self._load_bin(path)
                self._bin.update({k: (path, sd) for k in sd})
        self.files = files

    @staticmethod
    def _weight_files(directory: str) -> list[str]:
        """The weight files, from an index when there is one."""
        if not os.path.isdir(directory):
            raise ConversionError(f"{directory}: no such directory (expected a Hugging Face model directory)")
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = os.path.join(directory, index_name)
            if os.path.isfile(index):
                try:
                    with open(index) as f:
                        weight_map = json.load(f)["weight_map"]
                except (ValueError, KeyError) as e:
                    raise ConversionError(f"{index}: expected JSON with a 'weight_map' ({e})") from None
                files = [os.path.join(directory, f) for f in dict.fromkeys(weight_map.values())]
                for f in files:
                    if not os.path.isfile(f):
                        raise ConversionError(f"{index}: names shard {os.path.basename(f)}, which is missing")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(directory, single)):
                return [os.path.join(directory, single)]
        raise ConversionError(
            f"{directory}: no weights found; expected {SAFETENSORS_INDEX}, model.safetensors, {BIN_INDEX} "
            f"or pytorch_model.bin"
        )

    @staticmethod
    def _load_bin(path: str) -> dict[str, torch.Tensor]:
        # mmap: tensors are paged in when used, not all at once (zip-format .bin, torch >= 2.1).
        try:
            try:
                return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # legacy (non-zip) serialization cannot be mapped
                return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({e.__class__.__name__}: {e})") from None

    def names(self) -> list[str]:
        return list(self._st) + list(self._bin)

    def __contains__(self, name: str) -> bool:
        return name in self._st or name in self._bin

    def shape(self, name: str) -> tuple[int, ...]:
        return self._st[name].shape if name in self._st else tuple(self._bin[name][1][name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._st[name].dtype if name in self._st else self._bin[name][1][name].dtype

    def file_of(self, name: str) -> str:
        return self._st[name].file if name in self._st else self._bin[name][0]

    def load(self, name: str) -> torch.Tensor:
        """The tensor, freshly read (the caller owns it)."""
        if name in self._bin:
            return self._bin[name][1][name].clone()
        e = self._st[name]
        nbytes = e.end - e.begin
        if nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        buf = bytearray(nbytes)
        with open(e.file, "rb") as f:
            f.seek(e.begin)
            if f.readinto(buf) != nbytes:
                raise ConversionError(f"{e.file}: truncated; tensor {name} needs bytes {e.begin}..{e.end}")
        return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000' -> bytes (HF's ``max_shard_size`` spelling)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = str(text).strip().upper()
    try:
        unit, mult = next(((u, m) for u, m in units.items() if t.endswith(u)), ("", 1))
        size = int(float(t[: len(t) - len(unit)]) * mult)
    except (ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise ConversionError(
            f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 2GiB or a number of bytes"
        )
    return size


class SafetensorsShardWriter:
    """Writes tensors, in a fixed order announced up front, into sharded safetensors files.

    ``entries`` lists ``(name, shape, dtype)`` in write order; shards are cut at
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own). Call
    :meth:`write` once per entry, in order, then :meth:`close` (writes the index).
    """

    def __init__(
        self, directory: str, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
    ) -> None:
        self.directory = directory
        self.entries = list(entries)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in self.entries:
            nbytes = _nbytes(shape, dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype))
            size += nbytes
        n = len(shards)
        self.shards = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in self.entries)
        self._next = 0  # index into self.entries
        self._shard = -1
        self._file: Any | None = None
        self._remaining: list[str] = []

    def _open_shard(self, k: int) -> None:
        file_name, entries = self.shards[k]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._file = open(os.path.join(self.directory, file_name), "wb")  # noqa: SIM115 - closed by write/close
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._remaining = [name for name, _, _ in entries]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, shape, dtype = self.entries[self._next]
        if name != expected_name:
            raise RuntimeError(f"safetensors writer: expected {expected_name} next, got {name}")
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ConversionError(
                f"tensor {name}: produced shape {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {dtype}"
            )
        if not self._remaining:
            if self._file is not None:
                self._file.close()
            self._shard += 1
            self._open_shard(self._shard)
        self._remaining.pop(0)
        # Reinterpret as bytes without a copy; safetensors is little-endian like x86/ARM torch.
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            raise RuntimeError(f"safetensors writer: {len(self.entries) - self._next} tensors were not written")
        if self._file is not None:
            self._file.close()
        weight_map = {name: file_name for file_name, entries in self.shards for name, _, _ in entries}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with open(os.path.join(self.directory, SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()
