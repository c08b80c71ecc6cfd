"""Pre-flight report: what in a CT setup wastes GPU time, found before the first step.

Three checks, each from plain inputs (a checkpoint reader or tensors, dataset prefixes, a
tokenizer, a Hugging Face config dict), each returning :class:`Finding` records:

- **untrained rows** (:func:`check_vocab_rows`): input-embedding and output-layer rows whose
  norm is zero or far below the median row norm (``< ratio x median``, default 0.1), over
  the true vocabulary. Such rows belong to tokens the base never trained (reserved or
  added specials, unused byte pieces); when CT data contains them they are a known cause of
  gradient blow-ups in the first steps. Ids present in the data are named separately.
- **unused ids** (:func:`count_token_ids`, :func:`check_unused_ids`): token ids that never
  occur in the training datasets, counted over every ``.bin`` with ``numpy.bincount`` in
  chunks (cached beside the data like the other per-dataset indices). Old ids that never
  occur are normal (info); ids a vocabulary expansion appended that never occur get no
  training signal at all (warning). Ids outside the model's vocabulary are a warning.
- **special ids** (:func:`dataset_boundary_ids`, :func:`check_special_ids`): BOS/EOS/EOD/pad
  ids of the tokenizer, of the data and of the model (``eos_token_id`` & co. of the HF config
  recorded in the checkpoint, ``ct.hf.config``, or a ``config.json``) must agree. A dataset's
  EOD is the token that ends (at least 90% of) its documents; its BOS the special token
  that starts them, if any.

:func:`preflight` runs what its inputs allow, over the files training reads (:func:`as_datasets`:
a dataset glob is expanded by the trainer's own function); :func:`preflight_for_config` takes a
trainer config (the trainer calls it at start-up and logs the findings as warnings);
``tools/preflight.py`` is the command line. Severity ``warning`` means "look at this before
spending GPU time"; ``info`` is context. Nothing here raises for a finding: bad *input*
(missing files) raises :class:`~megatron_ct.errors.DataError` / ``ConversionError``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from megatron_ct.checkpoint.keys import VOCAB_MATRICES
from megatron_ct.errors import DataError

log = logging.getLogger("megatron_ct")

ROW_NORM_RATIO = 0.1
"""Rows with a norm below this fraction of the median row norm look untrained."""
BOUNDARY_SHARE = 0.9
"""A dataset's EOD (BOS) is the token that ends (starts) at least this share of its documents."""
COUNT_CHUNK = 1 << 24
"""Tokens per ``bincount`` call (32 MB of uint16 ids)."""
EXAMPLES = 10
"""Ids listed per finding (the counts are always complete)."""
ROW_BLOCK = 1 << 22
"""Elements of a vocabulary matrix read at once for row norms."""

GRADIENT_BLOWUP = "a known cause of gradient blow-ups at the start of CT"


@dataclass(frozen=True)
class Finding:
    """One thing the report says: how bad, what, where, what was expected, and the numbers."""

    severity: str  # "warning" | "info"
    check: str  # "untrained_rows" | "unused_ids" | "out_of_vocab_ids" | "special_ids" | "no_eod"
    what: str
    where: str
    expected: str
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.severity}: [{self.check}] {self.where}: {self.what}; expected {self.expected}"


@dataclass
class PreflightReport:
    findings: list[Finding]
    checked: dict  # what was looked at: {"checkpoint": ..., "datasets": {...}, "tokens": n, ...}

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def exit_code(self) -> int:
        """0: no warnings (info only); 1: warnings."""
        return 1 if self.warnings else 0

    def format(self) -> str:
        lines = ["pre-flight report"]
        for key, value in self.checked.items():
            lines.append(f"  {key}: {value}")
        for severity in ("warning", "info"):
            group = [f for f in self.findings if f.severity == severity]
            if group:
                lines.append(f"{len(group)} {severity}{'s' if len(group) > 1 else ''}:")
                for f in group:
                    lines += [f"  [{f.check}] {f.where}", f"    {f.what}", f"    expected: {f.expected}"]
        if not self.warnings:
            lines.append("clean: no warnings")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "checked": self.checked,
            "findings": [asdict(f) for f in self.findings],
        }


def _ids_text(ids: Sequence[int], tokenizer=None) -> str:
    shown = [int(i) for i in ids[:EXAMPLES]]
    if tokenizer is not None:
        parts = []
        for i in shown:
            try:
                parts.append(f"{i} {tokenizer.decode([i])!r}")
            except Exception:  # an id the tokenizer cannot decode is still worth naming
                parts.append(str(i))
        text = ", ".join(parts)
    else:
        text = ", ".join(map(str, shown))
    return text + (", ..." if len(ids) > EXAMPLES else "")


# --- untrained rows --------------------------------------------------------------------


def _rows(n: int, one: str = "is", many: str = "are") -> str:
    return f"{n} row {one}" if n == 1 else f"{n} rows {many}"


def row_norms(source: Any, key: str, vocab_size: int) -> torch.Tensor:
    """L2 norms (float64) of rows ``[0, vocab_size)`` of ``key``; ``source`` is a tensor or a
    checkpoint reader (rows are read a block at a time)."""
    if isinstance(source, torch.Tensor):
        return source[:vocab_size].double().norm(dim=1)
    shape = source.shape(key)
    step = max(1, ROW_BLOCK // max(shape[1], 1))
    parts = []
    for start in range(0, vocab_size, step):
        n = min(step, vocab_size - start)
        parts.append(source.read(key, (start, 0), (n, shape[1])).double().norm(dim=1))  # [n]
    return torch.cat(parts)


def check_vocab_rows(
    matrices: Mapping[str, Any],
    vocab_size: int,
    *,
    where: str = "checkpoint",
    ratio: float = ROW_NORM_RATIO,
    token_counts: np.ndarray | None = None,
    tokenizer=None,
) -> list[Finding]:
    """Untrained-looking rows of each ``[rows, h]`` matrix (name -> tensor or reader)."""
    findings = []
    for name, source in matrices.items():
        norms = row_norms(source, name, vocab_size)
        median = float(norms.median())
        zero = torch.nonzero(norms == 0).flatten().tolist()
        low = torch.nonzero((norms > 0) & (norms < ratio * median)).flatten().tolist()
        if not zero and not low:
            continue
        flagged = zero + low
        parts = []
        if zero:
            parts.append(f"{_rows(len(zero))} all zero (ids {_ids_text(zero, tokenizer)})")
        if low:
            parts.append(
                f"{_rows(len(low), 'has', 'have')} a norm < {ratio:g} x the median {median:.4g} "
                f"(ids {_ids_text(low, tokenizer)})"
            )
        details = {"zero_ids": zero, "low_norm_ids": low, "median_norm": median, "ratio": ratio}
        if token_counts is not None:
            seen = [i for i in flagged if i < len(token_counts) and token_counts[i] > 0]
            details["ids_in_data"] = seen
            occurrences = int(sum(int(token_counts[i]) for i in seen))
            parts.append(
                f"{len(seen)} of them occur in the training data ({occurrences:,} tokens"
                + (f": ids {_ids_text(seen, tokenizer)})" if seen else ")")
            )
        findings.append(
            Finding(
                "warning",
                "untrained_rows",
                "; ".join(parts),
                f"{where} {name}",
                f"trained rows with norms near the median; untrained rows are {GRADIENT_BLOWUP} "
                "(re-initialise them, e.g. to the mean row, or warm up embeddings first: "
                "train.trainable_params=[embeddings])",
                details,
            )
        )
    return findings


# --- token counts over the data ----------------------------------------------------------


@dataclass(frozen=True)
class DatasetFiles:
    """A dataset as the checks see it: prefixes and the fraction of documents used."""

    name: str
    prefixes: tuple[str, ...]
    doc_range: tuple[float, float] = (0.0, 1.0)


CONFIG_DATASETS_KEY = "data.datasets.{name}"
"""How errors name a dataset of a trainer config (the key training names)."""


def as_datasets(
    datasets: Mapping[str, Any], data_root: str | None = None, *, key: str = "dataset {name}"
) -> list[DatasetFiles]:
    """name -> prefix, list of prefixes or DatasetConfig, with the prefixes training reads
    (:func:`megatron_ct.data.stream.resolve_prefixes`): relative ones join ``data_root``, a glob
    stands for every prefix whose ``.idx`` it matches, sorted. A glob matching nothing is a
    one-line ConfigError, a missing ``.bin``/``.idx`` a DataError, each naming ``key``
    (``{name}``: the dataset's name; :data:`CONFIG_DATASETS_KEY` for a trainer config)."""
    from megatron_ct.data.stream import resolve_prefixes

    out = []
    for name, raw in datasets.items():
        if isinstance(raw, str):
            prefixes, rng = [raw], (0.0, 1.0)
        elif isinstance(raw, (list, tuple)):
            prefixes, rng = list(raw), (0.0, 1.0)
        else:  # DatasetConfig
            prefixes, rng = list(raw.prefixes), tuple(raw.doc_range)
        where = key.format(name=name)
        resolved = resolve_prefixes(prefixes, data_root, where)
        for p in resolved:
            missing = [p + e for e in (".bin", ".idx") if not os.path.isfile(p + e)]
            if missing:
                raise DataError(f"{where}: expected {p}.bin and {p}.idx, missing {' and '.join(missing)}")
        out.append(DatasetFiles(name, tuple(resolved), (float(rng[0]), float(rng[1]))))
    return out


def _index(prefix: str):
    """The validated index of ``prefix`` (lengths, byte pointers, dtype); DataError if corrupt."""
    from megatron_ct.data.indexed import open_indexed

    return open_indexed(prefix)


def _token_span(index, doc_range: tuple[float, float]) -> tuple[int, int, int, int]:
    """(first doc, end doc, first token, end token) of the document range (documents are
    stored in order, so their tokens are one contiguous span of the .bin)."""
    n = len(index.sequence_lengths)
    lo, hi = (int(round(f * n)) for f in doc_range)
    if hi <= lo:
        return lo, hi, 0, 0
    size = index.dtype.itemsize
    start = int(index.sequence_pointers[lo]) // size
    end = int(index.sequence_pointers[hi - 1]) // size + int(index.sequence_lengths[hi - 1])
    return lo, hi, start, end


def count_token_ids(
    datasets: Sequence[DatasetFiles], minlength: int = 0, *, progress: bool = False, cache=None
) -> tuple[np.ndarray, int]:
    """(occurrences per id over every dataset's documents, tokens counted). One pass over each
    ``.bin`` in chunks; per-file counts are cached (``IndexCache``) keyed by the file identity."""
    from tqdm import tqdm

    from megatron_ct.data.index_cache import IndexCache, cache_key

    cache = cache or IndexCache()
    spans = []
    for ds in datasets:
        for prefix in ds.prefixes:
            index = _index(prefix)
            spans.append((ds, prefix, index.dtype, *_token_span(index, ds.doc_range)[2:]))
    total = sum(end - start for *_, start, end in spans)
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc="counting token ids", disable=not progress, mininterval=0.5
    )
    counts = np.zeros(minlength, dtype=np.int64)
    t0 = time.perf_counter()
    for ds, prefix, dtype, start, end in spans:

        def build(prefix=prefix, dtype=dtype, start=start, end=end) -> np.ndarray:
            tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
            acc = np.zeros(0, dtype=np.int64)
            for a in range(start, end, COUNT_CHUNK):
                b = min(end, a + COUNT_CHUNK)
                c = np.bincount(tokens[a:b])
                if len(c) > len(acc):
                    acc = np.pad(acc, (0, len(c) - len(acc)))
                acc[: len(c)] += c
                bar.update(b - a)
            return acc

        key = cache_key({"file": [os.path.abspath(prefix), os.path.getsize(prefix + ".bin")], "span": [start, end]})
        loaded_before = cache.loaded
        part = np.asarray(cache.get(prefix, ds.name, key, "idcounts", build))
        if cache.loaded > loaded_before:
            bar.update(end - start)
        if len(part) > len(counts):
            counts = np.pad(counts, (0, len(part) - len(counts)))
        counts[: len(part)] += part
    bar.close()
    log.info("counted %s tokens of %d files in %.1fs", f"{total:,}", len(spans), time.perf_counter() - t0)
    return counts, total


def check_unused_ids(
    counts: np.ndarray,
    vocab_size: int,
    *,
    where: str,
    new_ids: tuple[int, int] | None = None,
    tokenizer=None,
) -> list[Finding]:
    """Ids ``< vocab_size`` that never occur (info; warning for ids in ``new_ids`` = [lo, hi),
    the rows a vocabulary expansion appended) and ids ``>= vocab_size`` that do (warning)."""
    findings = []
    used = counts[:vocab_size] > 0 if len(counts) >= vocab_size else np.pad(counts > 0, (0, vocab_size - len(counts)))
    unused = np.flatnonzero(~used)
    new_lo, new_hi = new_ids or (vocab_size, vocab_size)
    old_unused = unused[unused < new_lo]
    new_unused = unused[(unused >= new_lo) & (unused < new_hi)]
    if len(old_unused):
        findings.append(
            Finding(
                "info",
                "unused_ids",
                f"{len(old_unused):,} of {new_lo:,} base vocabulary ids never occur "
                f"(ids {_ids_text(old_unused.tolist(), tokenizer)})",
                where,
                "nothing: their rows stay as the base left them (only weight decay moves them)",
                {"count": int(len(old_unused)), "examples": old_unused[:EXAMPLES].tolist()},
            )
        )
    if len(new_unused):
        findings.append(
            Finding(
                "warning",
                "unused_ids",
                f"{len(new_unused):,} of the {new_hi - new_lo:,} ids the vocabulary expansion added never occur "
                f"(ids {_ids_text(new_unused.tolist(), tokenizer)})",
                where,
                "added tokens that the training data uses (tokenized with the expanded tokenizer?); "
                "unused ones only learn to be never predicted",
                {"count": int(len(new_unused)), "examples": new_unused[:EXAMPLES].tolist()},
            )
        )
    beyond = np.flatnonzero(counts[vocab_size:]) + vocab_size if len(counts) > vocab_size else np.array([], int)
    if len(beyond):
        findings.append(
            Finding(
                "warning",
                "out_of_vocab_ids",
                f"{len(beyond):,} ids >= the model's vocabulary of {vocab_size:,} occur "
                f"({int(counts[vocab_size:].sum()):,} tokens; ids {_ids_text(beyond.tolist())})",
                where,
                f"ids < {vocab_size} (data tokenized with the model's tokenizer; the trainer refuses this data)",
                {"count": int(len(beyond)), "examples": beyond[:EXAMPLES].tolist()},
            )
        )
    return findings


# --- special ids ------------------------------------------------------------------------


@dataclass(frozen=True)
class BoundaryIds:
    """The tokens that end / start a dataset's documents, when one token dominates."""

    name: str
    documents: int
    eod: int | None  # the token ending >= BOUNDARY_SHARE of documents
    eod_share: float
    first: int | None  # the token starting >= BOUNDARY_SHARE of documents
    first_share: float


def _dominant(ids: np.ndarray) -> tuple[int | None, float]:
    if len(ids) == 0:
        return None, 0.0
    values, counts = np.unique(ids, return_counts=True)
    top = int(np.argmax(counts))
    share = float(counts[top]) / len(ids)
    return (int(values[top]) if share >= BOUNDARY_SHARE else None), share


def dataset_boundary_ids(ds: DatasetFiles) -> BoundaryIds:
    """Last and first token of every (non-empty) document of the dataset, read from the .bin."""
    lasts, firsts = [], []
    for prefix in ds.prefixes:
        index = _index(prefix)
        lo, hi, _, _ = _token_span(index, ds.doc_range)
        lengths = np.asarray(index.sequence_lengths[lo:hi], dtype=np.int64)
        starts = np.asarray(index.sequence_pointers[lo:hi], dtype=np.int64) // index.dtype.itemsize
        keep = lengths > 0
        tokens = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
        lasts.append(np.asarray(tokens[(starts + lengths - 1)[keep]], dtype=np.int64))
        firsts.append(np.asarray(tokens[starts[keep]], dtype=np.int64))
    last, first = np.concatenate(lasts), np.concatenate(firsts)
    eod, eod_share = _dominant(last)
    bos, bos_share = _dominant(first)
    return BoundaryIds(ds.name, len(last), eod, eod_share, bos, bos_share)


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def check_special_ids(
    boundaries: Sequence[BoundaryIds],
    *,
    tokenizer=None,
    tokenizer_where: str = "tokenizer",
    hf_config: Mapping | None = None,
    model_where: str = "model config",
    vocab_size: int | None = None,
) -> list[Finding]:
    """BOS/EOS/EOD/pad agreement between tokenizer, data and model (see module docstring)."""
    findings = []
    m = hf_config or {}
    m_eos, m_bos, m_pad = _as_ids(m.get("eos_token_id")), _as_ids(m.get("bos_token_id")), _as_ids(m.get("pad_token_id"))
    t_eod = getattr(tokenizer, "eod_id", None)
    t_bos = getattr(tokenizer, "bos_id", None)
    t_pad = getattr(tokenizer, "pad_id", None)

    def warn(what, where, expected, **details):
        findings.append(Finding("warning", "special_ids", what, where, expected, details))

    specials = set(m_eos + m_bos + m_pad) | {i for i in (t_eod, t_bos, t_pad) if i is not None}
    for b in boundaries:
        where = f"dataset {b.name}"
        if b.eod is None:
            findings.append(
                Finding(
                    "info",
                    "no_eod",
                    f"no token ends most documents (the commonest ends {b.eod_share:.0%} of {b.documents:,})",
                    where,
                    "an EOD after every document (tools/preprocess_data.py appends the tokenizer's EOD by default) "
                    "if the model should learn to end documents",
                    {"documents": b.documents},
                )
            )
        else:
            share = f"{b.eod_share:.0%} of its {b.documents:,} documents end with id {b.eod}"
            if t_eod is not None and b.eod != t_eod:
                warn(
                    f"{share}, but the tokenizer's EOD is {t_eod}",
                    where,
                    f"documents ending with the tokenizer's EOD {t_eod} (re-tokenize with {tokenizer_where})",
                    data_eod=b.eod,
                    tokenizer_eod=t_eod,
                )
            if m_eos and b.eod not in m_eos:
                warn(
                    f"{share}, which is not the model's eos_token_id {m_eos if len(m_eos) > 1 else m_eos[0]}: "
                    "the model learns to end documents with a token generation does not stop at",
                    where,
                    f"the data's EOD to be the model's EOS ({model_where})",
                    data_eod=b.eod,
                    model_eos=m_eos,
                )
        if b.first is not None and b.first in specials:
            expected_bos = m_bos or ([t_bos] if t_bos is not None else [])
            if b.first not in expected_bos:
                warn(
                    f"{b.first_share:.0%} of its documents start with special id {b.first}, which is not the "
                    f"BOS ({expected_bos or 'none defined'})",
                    where,
                    "documents starting with the model's BOS or with text",
                    data_first=b.first,
                    bos=expected_bos,
                )
    eods = sorted({b.eod for b in boundaries if b.eod is not None})
    if len(eods) > 1 and t_eod is None:
        warn(
            f"datasets end documents with different ids {eods}",
            ", ".join(b.name for b in boundaries),
            "one EOD id across the datasets of a run",
            eods=eods,
        )
    if t_eod is not None and m_eos and t_eod not in m_eos:
        warn(
            f"the tokenizer's EOD {t_eod} is not the model's eos_token_id {m_eos}",
            f"{tokenizer_where} vs {model_where}",
            "the tokenizer the model was trained with",
            tokenizer_eod=t_eod,
            model_eos=m_eos,
        )
    for label, t_id, m_ids in (("bos", t_bos, m_bos), ("pad", t_pad, m_pad)):
        if t_id is not None and m_ids and t_id not in m_ids:
            warn(
                f"the tokenizer's {label} id {t_id} is not the model's {label}_token_id {m_ids[0]}",
                f"{tokenizer_where} vs {model_where}",
                "the tokenizer the model was trained with",
                **{f"tokenizer_{label}": t_id, f"model_{label}": m_ids},
            )
    if vocab_size is not None:
        named = {
            "tokenizer EOD": [t_eod],
            "tokenizer BOS": [t_bos],
            "tokenizer pad": [t_pad],
            "model eos_token_id": m_eos,
            "model bos_token_id": m_bos,
            "model pad_token_id": m_pad,
        }
        for label, ids in named.items():
            bad = [i for i in ids if i is not None and not 0 <= i < vocab_size]
            if bad:
                warn(
                    f"{label} {bad[0]} is outside the model's vocabulary of {vocab_size}",
                    tokenizer_where if label.startswith("tokenizer") else model_where,
                    f"special ids < {vocab_size}",
                    id=bad[0],
                )
    return findings


# --- everything ---------------------------------------------------------------------------


def preflight(
    *,
    vocab_rows: Mapping[str, Any] | None = None,
    vocab_size: int | None = None,
    vocab_expansion: Mapping | None = None,
    checkpoint_where: str = "checkpoint",
    datasets: Mapping[str, Any] | None = None,
    data_root: str | None = None,
    datasets_key: str = "dataset {name}",
    tokenizer=None,
    tokenizer_where: str = "tokenizer",
    hf_config: Mapping | None = None,
    model_where: str = "model config",
    ratio: float = ROW_NORM_RATIO,
    count_ids: bool = True,
    progress: bool = False,
    cache=None,
) -> PreflightReport:
    """Run every check its inputs allow.

    ``vocab_rows``: ``{embedding/output name: [rows, h] tensor or checkpoint reader}``;
    ``vocab_size``: the model's true vocabulary (else the tokenizer's); ``vocab_expansion``:
    ``{"old_vocab_size", "new_vocab_size"}`` of an expanded checkpoint; ``datasets``: name ->
    prefix(es) or ``DatasetConfig`` (the training data; globs expanded as training does, errors
    name ``datasets_key``, see :func:`as_datasets`); ``hf_config``: the model's HF config
    dict (token ids); ``count_ids=False`` skips the pass over the data.
    """
    vocab_size = vocab_size or getattr(tokenizer, "vocab_size", None)
    files = as_datasets(datasets or {}, data_root, key=datasets_key)
    checked: dict[str, Any] = {}
    findings: list[Finding] = []
    if files:
        checked["datasets"] = ", ".join(
            f"{f.name} ({len(f.prefixes)} prefix{'es' if len(f.prefixes) > 1 else ''})" for f in files
        )
    counts = None
    if files and count_ids:
        counts, total = count_token_ids(files, vocab_size or 0, progress=progress, cache=cache)
        checked["tokens counted"] = f"{total:,} in {len(files)} datasets ({', '.join(f.name for f in files)})"
    if vocab_rows:
        if vocab_size is None:
            raise DataError("pre-flight: the vocabulary size is unknown (expected a checkpoint, model or tokenizer)")
        checked["vocabulary rows"] = f"{', '.join(vocab_rows)} of {checkpoint_where}, {vocab_size:,} ids"
        findings += check_vocab_rows(
            vocab_rows, vocab_size, where=checkpoint_where, ratio=ratio, token_counts=counts, tokenizer=tokenizer
        )
    if counts is not None and vocab_size:
        new = None
        if vocab_expansion:
            new = (int(vocab_expansion["old_vocab_size"]), int(vocab_expansion["new_vocab_size"]))
        where = "training data " + ", ".join(f.name for f in files)
        findings += check_unused_ids(counts, vocab_size, where=where, new_ids=new, tokenizer=tokenizer)
    boundaries = [dataset_boundary_ids(f) for f in files]
    if tokenizer is not None:
        checked["tokenizer"] = (
            f"{tokenizer_where} (EOD {tokenizer.eod_id}, BOS {tokenizer.bos_id}, pad {tokenizer.pad_id})"
        )
    if hf_config:
        ids = {k: hf_config.get(k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}
        checked["model token ids"] = f"{model_where} {ids}"
    if boundaries or tokenizer is not None or hf_config:
        findings += check_special_ids(
            boundaries,
            tokenizer=tokenizer,
            tokenizer_where=tokenizer_where,
            hf_config=hf_config,
            model_where=model_where,
            vocab_size=vocab_size,
        )
    return PreflightReport(findings, checked)


def checkpoint_inputs(ckpt: str) -> dict[str, Any]:
    """:func:`preflight` keyword arguments from one of our checkpoints: its vocabulary rows
    (read lazily, block by block), true vocabulary, expansion record and recorded HF config."""
    from megatron_ct.checkpoint.rewrite import open_checkpoint

    path, reader, meta = open_checkpoint(ckpt, key="--checkpoint")
    hf = (meta.hf or {}).get("config")
    return {
        "vocab_rows": {k: reader for k in VOCAB_MATRICES if k in reader.tensors},
        "vocab_size": meta.true_vocab_size,
        "vocab_expansion": meta.vocab_expansion,
        "checkpoint_where": path,
        "hf_config": hf,
        "model_where": f"{path} (ct.hf.config)" if hf else "model config",
    }


def read_hf_config_file(path: str) -> dict:
    """A Hugging Face ``config.json`` (or the directory holding one)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{file}: not found (expected a Hugging Face config.json)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON ({e})") from None


def preflight_for_config(cfg, *, count_ids: bool = True, progress: bool = False) -> PreflightReport:
    """The report for a trainer config: ``checkpoint.load`` (vocabulary rows, recorded HF
    token ids), the training datasets of ``data.datasets``, ``data.tokenizer`` and
    ``model.vocab_size``. Meant for rank 0 at start-up; log each finding's ``line()``."""
    from megatron_ct.data.index_cache import IndexCache

    kwargs: dict[str, Any] = {}
    if cfg.checkpoint.load:
        kwargs = checkpoint_inputs(cfg.checkpoint.load)
    tokenizer = None
    if cfg.data.tokenizer:
        from megatron_ct.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(cfg.data.tokenizer)
        except (OSError, ValueError) as e:
            raise DataError(f"data.tokenizer: {e}") from None
    kwargs["vocab_size"] = cfg.model.vocab_size
    return preflight(
        **kwargs,
        datasets=cfg.data.datasets if cfg.data.source == "indexed" else {},
        data_root=cfg.data.data_root,
        datasets_key=CONFIG_DATASETS_KEY,
        tokenizer=tokenizer,
        tokenizer_where=f"data.tokenizer {cfg.data.tokenizer}" if cfg.data.tokenizer else "tokenizer",
        count_ids=count_ids,
        progress=progress,
        cache=IndexCache(cfg.data.index_cache_dir),
    )


def log_findings(report: PreflightReport, logger: logging.Logger = log) -> None:
    """Start-up use: every warning as a log warning, a one-line summary otherwise."""
    for f in report.warnings:
        logger.warning("pre-flight: %s", f.line())
    n_info = len(report.findings) - len(report.warnings)
    logger.info(
        "pre-flight: %d warnings, %d notes (tools/preflight.py prints the full report)", len(report.warnings), n_info
    )
