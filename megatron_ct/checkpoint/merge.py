"""Weighted sums of checkpoints (interpolation, averaging), streamed one region at a time.

``merged = sum_i w_i * ckpt_i`` tensor by tensor, for checkpoints of one architecture saved at
any TP/PP (tensors are stored in global coordinates, see :mod:`megatron_ct.checkpoint.dist_io`).
Interpolating a base and its CT checkpoint is ``w = (1 - alpha, alpha)``; averaging the last
checkpoints of a run is equal weights. Weights must add up to 1.

:class:`MergedCheckpoint` reads like a :class:`~megatron_ct.checkpoint.dist_io.DistCheckpointReader`
whose regions are computed on read: each input's region is read and accumulated in float64,
a bounded block of rows at a time, then cast to the output dtype. Writing it as our checkpoint
(:func:`merge_checkpoints`) produces one layer slice (or one row block) at a time; exporting it
to Hugging Face goes through :func:`megatron_ct.convert.ct_to_hf.export_hf` with the same reader,
so the model is never held.

Exactness: inputs with weight 0 are not read, and a term with weight 1 is the input itself,
so ``alpha=0`` returns the base and ``alpha=1`` the CT checkpoint bit for bit (fp32, bf16 and
fp16 values are exact in float64); N equal weights over N copies of one checkpoint return it.

Vocabulary rows (``embedding.word_embeddings.weight``, ``output_layer.weight``: ``[rows, h]``).
Inputs may differ in vocabulary size ``V_i`` only when the larger one is the vocabulary
expansion of the smaller (its ``ct.vocab_expansion.old_vocab_size`` is ``V_i``: appended ids,
old ids unchanged). With ``V = max V_i`` and ``P`` the stored rows of the primary input (the
last input whose vocabulary is ``V``), output row ``r`` is::

    r < V      the weighted sum over the inputs that hold token r (r < V_i), with their weights
               rescaled to add up to 1; when those weights add up to 0 (alpha=0 for the rows
               an expansion appended), the holders count equally
    V <= r < P padding: the same over the inputs of vocabulary V that store row r, else 0

so for a base and its expanded CT checkpoint, old rows interpolate and the appended rows come
from the CT side at every alpha. Rows past an input's true vocabulary (its padding) are never
used. Padding rows are masked out of the logits and never looked up.

Anything else must match: model config (except ``vocab_size``, ``init_method_std``,
``transformer_impl``), tensor names and shapes; a mismatch is a one-line
:class:`~megatron_ct.errors.ConversionError`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch

from megatron_ct.checkpoint.dist_io import ChunkSpec, DistCheckpointReader
from megatron_ct.checkpoint.keys import LAYER_PREFIX, VOCAB_MATRICES
from megatron_ct.checkpoint.meta import CheckpointMeta
from megatron_ct.checkpoint.rewrite import model_keys, open_checkpoint, write_weights_only
from megatron_ct.checkpoint.root import iter_dir
from megatron_ct.errors import ConversionError, CTError

# Model config keys that do not change what the stored tensors mean.
# Model settings that change no stored tensor and not what the weights compute: how a run pads
# the vocabulary, initialises, or which kernels and how long a position table it uses.
IGNORED_MODEL_KEYS = (
    "vocab_size",
    "make_vocab_size_divisible_by",
    "init_method_std",
    "transformer_impl",
    "attention_backend",
    "attention_softmax_in_fp32",
    "loss_chunk_size",
    "max_position_embeddings",
)
# Elements accumulated at once (float64, 32 MB): what a region read holds beyond its output.
BLOCK_ELEMENTS = 1 << 22
WEIGHT_SUM_TOLERANCE = 1e-6


def _aliases() -> dict[str, str]:
    """Other spellings of layer tensors (unfused norm names) -> the name we write, for every family."""
    from megatron_ct.families import all_families

    return {alias: key for family in all_families().values() for alias, key in family.ct_aliases().items()}


@dataclass(frozen=True)
class MergeInput:
    """One checkpoint of a merge and its weight."""

    path: str  # the iteration directory
    reader: DistCheckpointReader
    meta: CheckpointMeta
    weight: float
    vocab: int  # true vocabulary size
    keys: dict[str, str]  # our tensor name -> name stored in this checkpoint


def check_weights(weights: list[float] | None, n: int) -> list[float]:
    """The weights of ``n`` inputs (None: equal); they must be finite and add up to 1."""
    if n < 1:
        raise ConversionError("--inputs: expected at least one checkpoint")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConversionError(f"--weights: expected {n} weights, one per input, got {len(weights)}")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ConversionError(f"--weights: expected finite numbers, got {bad[0]}")
    total = math.fsum(weights)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ConversionError(
            f"--weights: expected weights adding up to 1 (a weighted average), got {total:g}; "
            "omit --weights for an equal average"
        )
    return [float(w) for w in weights]


def _open_input(ckpt: str, weight: float, aliases: dict[str, str]) -> MergeInput:
    try:
        path, reader, meta = open_checkpoint(ckpt, key="--inputs")
    except CTError as e:
        raise ConversionError(str(e)) from None
    vocab = meta.true_vocab_size
    keys = {}
    for stored in model_keys(reader):
        name = aliases.get(stored, stored)
        if name in keys:
            raise ConversionError(f"{path}: tensor {name} is stored twice (as {keys[name]} and {stored})")
        keys[name] = stored
    return MergeInput(path, reader, meta, weight, int(vocab), keys)


def _check_compatible(inputs: list[MergeInput]) -> MergeInput:
    """Refuse inputs that cannot be merged; returns the primary input (see module docstring)."""
    first = inputs[0]
    model0 = first.meta.model
    for inp in inputs[1:]:
        model = inp.meta.model
        for key in sorted(set(model0) | set(model)):
            if key in IGNORED_MODEL_KEYS or model0.get(key) == model.get(key):
                continue
            raise ConversionError(
                f"{inp.path}: model.{key}={model.get(key)!r} but {first.path} has {model0.get(key)!r}; "
                "expected checkpoints of one architecture (only the vocabulary may differ)"
            )
        for name in sorted(set(first.keys) ^ set(inp.keys)):
            holder, other = (first, inp) if name in first.keys else (inp, first)
            raise ConversionError(f"{other.path}: has no tensor {name}, which {holder.path} has")
        for name in first.keys:
            s0, s = first.reader.shape(first.keys[name]), inp.reader.shape(inp.keys[name])
            same = s0[1:] == s[1:] if name in VOCAB_MATRICES else s0 == s
            if not same:
                raise ConversionError(f"{inp.path}: tensor {name} has shape {s}, {first.path} has {s0}")
    for inp in inputs:
        for name in VOCAB_MATRICES:
            if name in inp.keys and inp.reader.shape(inp.keys[name])[0] < inp.vocab:
                raise ConversionError(
                    f"{inp.path}: {name} has {inp.reader.shape(inp.keys[name])[0]} rows, fewer than its "
                    f"vocabulary of {inp.vocab} tokens"
                )
    vocab = max(inp.vocab for inp in inputs)
    widest = [inp for inp in inputs if inp.vocab == vocab]
    for inp in inputs:
        if inp.vocab == vocab:
            continue
        expanded_from = {(w.meta.vocab_expansion or {}).get("old_vocab_size") for w in widest}
        if inp.vocab not in expanded_from:
            raise ConversionError(
                f"{inp.path}: vocabulary of {inp.vocab} tokens, but {widest[-1].path} has {vocab} and records no "
                f"vocabulary expansion from {inp.vocab} (ct.vocab_expansion); expected the same vocabulary, or a "
                "base and its vocabulary-expanded CT checkpoint"
            )
    return widest[-1]


class MergedCheckpoint:
    """The weighted sum of ``inputs``, read region by region like a ``DistCheckpointReader``."""

    def __init__(self, inputs: list[MergeInput], dtype: torch.dtype | None = None) -> None:
        self.inputs = inputs
        self.primary = _check_compatible(inputs)
        self.vocab = self.primary.vocab
        self.path = self.primary.path  # tokenizer files and messages refer to the primary input
        p = self.primary
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            name: (p.reader.shape(stored), dtype or p.reader.dtype(stored)) for name, stored in p.keys.items()
        }
        rows = {self.tensors[n][0][0] for n in VOCAB_MATRICES if n in self.tensors}
        if len(rows) > 1:
            raise ConversionError(f"{p.path}: embedding and output layer store different row counts {sorted(rows)}")
        self.padded_vocab = rows.pop() if rows else self.vocab

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key][1]

    def ct_metadata(self) -> CheckpointMeta:
        """The primary input's metadata, describing the merged tensors."""
        meta = copy.deepcopy(self.primary.meta)
        meta.model["vocab_size"] = self.vocab
        return dataclasses.replace(
            meta,
            true_vocab_size=self.vocab,
            padded_vocab_size=self.padded_vocab,
            merge={"inputs": [i.path for i in self.inputs], "weights": [i.weight for i in self.inputs]},
        )

    # --- which inputs make which rows ----------------------------------------------------
    def _terms(self, holders: list[MergeInput]) -> list[tuple[MergeInput, float]]:
        """(input, weight) to add for a region held by ``holders``; zero weights are dropped."""
        if not holders:
            return []
        if len(holders) == len(self.inputs):
            return [(i, i.weight) for i in holders if i.weight != 0.0]
        total = math.fsum(i.weight for i in holders)
        if total == 0.0:
            return [(i, 1.0 / len(holders)) for i in holders]
        return [(i, i.weight / total) for i in holders if i.weight != 0.0]

    def _row_segments(self, key: str, lo: int, hi: int) -> list[tuple[int, int, list[MergeInput]]]:
        """Rows ``[lo, hi)`` of a vocabulary matrix split where the set of holders changes."""
        stored = {id(i): i.reader.shape(i.keys[key])[0] for i in self.inputs}
        cuts = {lo, hi, self.vocab} | {i.vocab for i in self.inputs} | set(stored.values())
        points = sorted(c for c in cuts if lo <= c <= hi)
        segments = []
        for a, b in zip(points, points[1:], strict=False):
            if a < self.vocab:
                holders = [i for i in self.inputs if a < i.vocab]
            else:
                holders = [i for i in self.inputs if i.vocab == self.vocab and a < stored[id(i)]]
            segments.append((a, b, holders))
        return segments

    # --- reading ---------------------------------------------------------------------------
    def read(
        self, key: str, offsets: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of merged tensor ``key`` (whole by default)."""
        shape = self.shape(key)
        offsets = tuple(offsets or (0,) * len(shape))
        sizes = tuple(sizes or shape)
        out = torch.empty(sizes, dtype=self.dtype(key))
        if key in VOCAB_MATRICES:
            for a, b, holders in self._row_segments(key, offsets[0], offsets[0] + sizes[0]):
                self._fill(key, out, offsets, sizes, 0, a, b, self._terms(holders))
        else:
            axis = next((d for d, s in enumerate(sizes) if s > 1), 0)  # [1, rows, ...] layer slices: rows
            self._fill(
                key, out, offsets, sizes, axis, offsets[axis], offsets[axis] + sizes[axis], self._terms(self.inputs)
            )
        return out

    def _fill(self, key, out, offsets, sizes, axis: int, lo: int, hi: int, terms) -> None:
        """Write global indices ``[lo, hi)`` along ``axis`` of the region into ``out``, in blocks."""
        per_index = math.prod(sizes) // max(sizes[axis], 1)
        step = max(1, BLOCK_ELEMENTS // max(per_index, 1))
        for start in range(lo, hi, step):
            stop = min(hi, start + step)
            o = list(offsets)
            s = list(sizes)
            o[axis], s[axis] = start, stop - start
            dest = out.narrow(axis, start - offsets[axis], stop - start)
            if not terms:
                dest.zero_()
                continue
            acc = None
            for inp, w in terms:
                x = inp.reader.read(inp.keys[key], tuple(o), tuple(s)).to(torch.float64)
                if acc is None:
                    acc = x if w == 1.0 else x.mul_(w)
                else:
                    acc.add_(x, alpha=w)
                del x
            dest.copy_(acc)


def open_merge(inputs: list[str], weights: list[float] | None, dtype: torch.dtype | None = None) -> MergedCheckpoint:
    """Open and check the inputs; the merge is computed when read."""
    weights = check_weights(weights, len(inputs))
    aliases = _aliases()
    return MergedCheckpoint([_open_input(c, w, aliases) for c, w in zip(inputs, weights, strict=True)], dtype)


def plan_chunks(merged: MergedCheckpoint) -> list[ChunkSpec]:
    """Output chunks: one per layer of stacked ``[L, ...]`` tensors, split into row blocks of at
    most ``BLOCK_ELEMENTS`` elements; other tensors in row blocks."""
    chunks = []
    for key, (shape, dtype) in merged.tensors.items():
        layers = range(shape[0]) if key.startswith(LAYER_PREFIX) and len(shape) > 1 else [None]
        for layer in layers:
            if layer is None:
                base_off, base_size, axis = (0,) * len(shape), shape, 0
            else:
                base_off, base_size = (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:])
                axis = 1 if len(shape) > 1 else 0
            per_index = math.prod(base_size) // max(base_size[axis], 1)
            step = max(1, BLOCK_ELEMENTS // max(per_index, 1))
            for start in range(0, base_size[axis] or 1, step):
                off, size = list(base_off), list(base_size)
                off[axis], size[axis] = start, min(step, base_size[axis] - start)
                off, size = tuple(off), tuple(size)
                chunks.append(
                    ChunkSpec(key, shape, off, size, dtype, lambda k=key, o=off, s=size: merged.read(k, o, s))
                )
    return chunks


@dataclass
class MergeReport:
    output: str
    inputs: list[str]
    weights: list[float]
    vocab: int
    tensors: int
    bytes_written: int
    seconds: float
    hf: bool
    warnings: list[str]

    def summary(self) -> str:
        parts = ", ".join(f"{w:g} x {p}" for p, w in zip(self.inputs, self.weights, strict=True))
        return (
            f"wrote {self.output}{' (Hugging Face)' if self.hf else ''}: {parts}; vocabulary {self.vocab}; "
            f"{self.tensors} tensors, {self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f}s"
        )


def _check_output(out_dir: str, merged: MergedCheckpoint) -> None:
    out = os.path.realpath(out_dir)
    for inp in merged.inputs:
        src = os.path.realpath(inp.path)
        if src == out or src.startswith(out + os.sep) or src == os.path.realpath(iter_dir(out_dir, 0)):
            raise ConversionError(f"--output {out_dir}: holds input {inp.path}; expected a new directory")


def merge_checkpoints(
    inputs: list[str],
    weights: list[float] | None,
    out_dir: str,
    *,
    hf: bool = False,
    dtype: str | None = None,
    hf_base: str | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> MergeReport:
    """Write the weighted sum of ``inputs`` to ``out_dir``: our checkpoint (a save root holding
    ``iter_0000000``, weights only, loadable with ``checkpoint.load_weights_only=true`` at any
    TP/PP) or, with ``hf``, a Hugging Face model directory."""
    from megatron_ct.convert.hf_to_ct import parse_dtype
    from megatron_ct.convert.progress import Progress

    t0 = time.perf_counter()
    merged = open_merge(inputs, weights, parse_dtype(dtype))
    _check_output(out_dir, merged)
    ct = merged.ct_metadata()
    if hf:
        from megatron_ct.convert.ct_to_hf import export_hf

        report = export_hf(
            merged, ct, out_dir, hf_base=hf_base, tokenizer=tokenizer, overwrite=overwrite, progress=progress
        )
        n, nbytes, warnings = report.tensors, report.bytes_written, report.warnings
    else:
        chunks = plan_chunks(merged)
        bar = Progress(len(chunks), sum(c.nbytes for c in chunks), "merge", enabled=progress)

        def counted(c: ChunkSpec) -> ChunkSpec:
            def produce():
                t = c.produce()
                bar.update(c.nbytes)
                return t

            return ChunkSpec(c.key, c.global_shape, c.offsets, c.sizes, c.dtype, produce)

        write_weights_only(out_dir, [counted(c) for c in chunks], ct, overwrite)
        bar.close()
        _copy_hf_assets(merged.primary.path, out_dir)
        n, nbytes, warnings = len(merged.tensors), sum(c.nbytes for c in chunks), []
    return MergeReport(
        out_dir,
        [i.path for i in merged.inputs],
        [i.weight for i in merged.inputs],
        merged.vocab,
        n,
        nbytes,
        time.perf_counter() - t0,
        hf,
        warnings,
    )


def _copy_hf_assets(primary_iter: str, out_dir: str) -> None:
    """Tokenizer files a converted primary input keeps beside it, for a later ct-to-hf."""
    src = os.path.join(os.path.dirname(os.path.normpath(primary_iter)), "hf_assets")
    dst = os.path.join(out_dir, "hf_assets")
    if not os.path.isdir(src) or os.path.realpath(src) == os.path.realpath(dst):
        return
    shutil.rmtree(dst + ".partial", ignore_errors=True)
    shutil.copytree(src, dst + ".partial")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(dst + ".partial", dst)
