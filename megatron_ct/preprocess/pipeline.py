"""Tokenize JSON-lines / plain-text corpora into megatron-core ``IndexedDataset`` files.

Pipeline: ``resolve_inputs`` (fail fast on bad paths) -> ``read_chunks`` (raw
lines, main process) -> ``ChunkEncoder`` (parse + tokenize, N worker processes,
results consumed in input order so the output is byte-identical for any worker
count) -> ``IndexedDatasetWriter`` (megatron-core builder, temporary names,
published at the end) -> a summary printed by the caller and saved as
``{output_prefix}_summary.json``.

Outputs, one per JSON key (Megatron-LM naming): ``{output_prefix}_{key}_document.bin/.idx``;
in instruction mode a single ``{output_prefix}_instruction_document.bin/.idx``.
Each document is one sequence of token ids, followed by the EOD id unless
``append_eod`` is off. Ids are uint16 when the vocabulary has < 65500 entries,
else int32 (megatron-core's ``DType.optimal_dtype``).

A line that cannot become a document (invalid UTF-8 or JSON, a missing or
non-string key, an empty document) is skipped and counted by reason; the first
few are logged with ``path:line``. With several JSON keys a line is kept only
if every key is usable, so document i is the same record in every output.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from megatron_ct.errors import DataError
from megatron_ct.preprocess.encode import (
    INSTRUCTION_KEY,
    SKIP_REASONS,
    ChunkEncoder,
    EncodedChunk,
    EncodeSpec,
    encode_in_worker,
    init_worker,
)
from megatron_ct.preprocess.inputs import InputFile, PreprocessError, read_chunks, resolve_inputs
from megatron_ct.preprocess.writer import IndexedDatasetWriter, optimal_dtype
from megatron_ct.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["PreprocessConfig", "PreprocessError", "preprocess", "format_summary", "output_prefixes"]


@dataclass(kw_only=True)
class PreprocessConfig:
    """Options of one preprocessing run (the CLI flags of ``tools/preprocess_data.py``)."""

    inputs: list[str]
    """Input files or globs: ``.jsonl``/``.json`` (JSON lines) or ``.txt`` (a document per line),
    optionally ``.gz``."""
    output_prefix: str
    """Outputs are ``{output_prefix}_{key}_document.bin/.idx`` and ``{output_prefix}_summary.json``."""
    tokenizer: str
    """SentencePiece ``.model`` file or Hugging Face tokenizer directory."""
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    """JSON keys to tokenize, one output each. Plain-text inputs provide only ``text``."""
    instruction_keys: tuple[str, str] | None = None
    """(instruction, response) keys: write one ``{instruction}\\n{response}`` document per line
    (unsupervised instruction data, as in Ziya2's stage 2) instead of ``json_keys``."""
    append_eod: bool = True
    """Append the tokenizer's EOD id after every document."""
    workers: int = 1
    """Tokenizer processes; 1 runs everything in this process."""
    log_interval: int = 1000
    """Refresh the progress bar's docs/s and tokens/s every this many documents."""
    chunk_lines: int = 1024
    """Lines per unit of work sent to a worker."""
    max_warnings: int = 5
    """Skipped lines logged individually; the rest only counted."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise PreprocessError(f"--workers must be >= 1, got {self.workers}")
        if self.log_interval < 1:
            raise PreprocessError(f"--log-interval must be >= 1, got {self.log_interval}")
        if self.chunk_lines < 1:
            raise PreprocessError(f"chunk_lines must be >= 1, got {self.chunk_lines}")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise PreprocessError(f"--json-keys must be non-empty and distinct, got {self.json_keys}")
        if self.instruction_keys is not None:
            if len(self.instruction_keys) != 2 or self.instruction_keys[0] == self.instruction_keys[1]:
                raise PreprocessError(f"--instruction-keys needs two distinct keys, got {self.instruction_keys}")
            if self.json_keys != ["text"]:
                raise PreprocessError("--instruction-keys replaces --json-keys; pass only one of them")
            self.instruction_keys = tuple(self.instruction_keys)


def output_prefixes(config: PreprocessConfig) -> dict[str, str]:
    """Output key -> path prefix of its ``.bin``/``.idx`` pair."""
    keys = [INSTRUCTION_KEY] if config.instruction_keys else config.json_keys
    return {key: f"{config.output_prefix}_{key}_document" for key in keys}


def _check_inputs_fit_mode(files: list[InputFile], config: PreprocessConfig) -> None:
    text_files = [f.path for f in files if not f.is_json]
    if text_files and (config.instruction_keys or config.json_keys != ["text"]):
        raise PreprocessError(
            f"plain-text input {text_files[0]} has one field, 'text'; "
            "--json-keys/--instruction-keys need JSON-lines inputs"
        )


def _load_tokenizer(path: str) -> Tokenizer:
    try:
        return load_tokenizer(path)
    except (OSError, ValueError, DataError) as exc:
        raise PreprocessError(str(exc)) from None


def _encoded_chunks(
    files: list[InputFile], spec: EncodeSpec, config: PreprocessConfig, tokenizer: Tokenizer
) -> Iterator[EncodedChunk]:
    """Encoded chunks in input order, from this process or a worker pool."""
    chunks = read_chunks(files, config.chunk_lines)
    if config.workers == 1:
        encoder = ChunkEncoder(spec, tokenizer)
        for chunk in chunks:
            yield encoder(chunk, files[chunk.file_index].is_json)
        return
    # Processes already parallelize; HF's Rust thread pool would oversubscribe
    # the cores (and warns once it finds itself forked).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # apply_async with a bounded window rather than Pool.imap: imap's feeder
    # thread would read the whole input into memory ahead of the workers.
    window = 4 * config.workers
    with multiprocessing.Pool(config.workers, initializer=init_worker, initargs=(spec,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_in_worker, (chunk, files[chunk.file_index].is_json)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class _Stats:
    """Running totals of a run."""

    keys: list[str]
    lines: int = 0
    docs: int = 0
    tokens: Counter = field(default_factory=Counter)
    characters: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skip_examples: list[str] = field(default_factory=list)
    """``path:line: reason`` of the first few skipped lines."""

    def add(self, enc: EncodedChunk) -> None:
        self.lines += enc.lines
        self.docs += enc.docs
        for key in self.keys:
            self.tokens[key] += len(enc.tokens[key])
            self.characters[key] += enc.characters[key]
        self.skipped.update(reason for _, reason, _ in enc.skipped)


def _report_skips(enc: EncodedChunk, path: str, stats: _Stats, config: PreprocessConfig) -> None:
    """Log the run's first ``max_warnings`` skipped lines as ``path:line``; count the rest."""
    already = sum(stats.skipped.values()) - len(enc.skipped)  # stats already include this chunk
    for n, (line_no, reason, detail) in enumerate(enc.skipped, start=already):
        if n < config.max_warnings:
            where = f"{path}:{line_no}: skipped line ({reason}{': ' + detail if detail else ''})"
            stats.skip_examples.append(where)
            logger.warning("%s", where)
        elif n == config.max_warnings:
            logger.warning("more skipped lines are only counted; see the summary")


def _summary(
    config: PreprocessConfig,
    files: list[InputFile],
    tokenizer: Tokenizer,
    dtype: type[np.number],
    stats: _Stats,
    setup_s: float,
    elapsed: float,
) -> dict:
    tokens = sum(stats.tokens.values())
    chars = sum(stats.characters.values())
    eod = stats.docs * len(stats.keys) if config.append_eod else 0
    return {
        "inputs": [f.path for f in files],
        "outputs": output_prefixes(config),
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "append_eod": config.append_eod,
        "workers": config.workers,
        "lines": stats.lines,
        "docs": stats.docs,
        "tokens": tokens,  # written ids, EOD included
        "characters": chars,  # of the written documents
        "bytes": sum(f.size for f in files),  # read from disk (compressed size for .gz)
        "tokens_per_character": (tokens - eod) / chars if chars else 0.0,  # EOD excluded
        "per_key": {k: {"tokens": stats.tokens[k], "characters": stats.characters[k]} for k in stats.keys},
        "skipped": {reason: stats.skipped[reason] for reason in SKIP_REASONS if stats.skipped[reason]},
        "skipped_examples": stats.skip_examples,
        "setup_s": round(setup_s, 3),  # input checks, tokenizer and megatron-core imports
        "elapsed_s": round(elapsed, 3),  # reading, tokenizing and writing, after setup
        "docs_per_s": stats.docs / elapsed if elapsed else 0.0,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
    }


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _progress_bar(files: list[InputFile], config: PreprocessConfig) -> tqdm:
    # Counted in input bytes, so tqdm's rate and ETA follow the bytes read of
    # the total; docs/s and tokens/s ride along in the postfix.
    return tqdm(
        total=sum(f.size for f in files),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="preprocess",
        mininterval=0.5,
        disable=not config.progress,
    )


def _tokenize_and_write(
    files: list[InputFile],
    spec: EncodeSpec,
    config: PreprocessConfig,
    tokenizer: Tokenizer,
    writer: IndexedDatasetWriter,
    stats: _Stats,
) -> None:
    """The main loop: encoded chunks, in input order, into the writer."""
    start = time.perf_counter()
    next_refresh = config.log_interval
    # closing(): on an error the worker pool is torn down at once, not when the
    # generator happens to be garbage collected.
    with (
        _progress_bar(files, config) as bar,
        logging_redirect_tqdm(),
        closing(_encoded_chunks(files, spec, config, tokenizer)) as chunks,
    ):
        for enc in chunks:
            for key in writer.prefixes:
                writer.add_documents(key, enc.tokens[key], enc.lengths[key])
            stats.add(enc)
            _report_skips(enc, files[enc.file_index].path, stats, config)
            bar.update(enc.bytes_done - bar.n)
            if stats.docs >= next_refresh:
                elapsed = max(time.perf_counter() - start, 1e-9)
                tokens = sum(stats.tokens.values())
                rates = f"{stats.docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tok/s"
                bar.set_postfix_str(rates, refresh=False)  # drawn at tqdm's next mininterval tick
                next_refresh = stats.docs + config.log_interval


def preprocess(config: PreprocessConfig) -> dict:
    """Run one preprocessing job; return the summary (also saved as JSON).

    Raises:
        PreprocessError: bad inputs or tokenizer, raised before any output is created.
    """
    start = time.perf_counter()
    files = resolve_inputs(config.inputs)
    _check_inputs_fit_mode(files, config)
    tokenizer = _load_tokenizer(config.tokenizer)
    dtype = optimal_dtype(tokenizer.vocab_size)
    prefixes = output_prefixes(config)
    spec = EncodeSpec(
        tokenizer_path=config.tokenizer,
        json_keys=tuple(config.json_keys),
        instruction_keys=config.instruction_keys,
        append_eod=config.append_eod,
        dtype=np.dtype(dtype).name,
    )
    os.makedirs(os.path.dirname(os.path.abspath(config.output_prefix)), exist_ok=True)
    stats = _Stats(keys=list(prefixes))
    setup_done = time.perf_counter()
    with IndexedDatasetWriter(prefixes, dtype) as writer:
        _tokenize_and_write(files, spec, config, tokenizer, writer, stats)
        writer.commit()
    elapsed = time.perf_counter() - setup_done
    summary = _summary(config, files, tokenizer, dtype, stats, setup_done - start, elapsed)
    _write_json(config.output_prefix + "_summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable closing summary of a run."""
    skipped = summary["skipped"]
    skipped_text = ", ".join(f"{r}={n}" for r, n in skipped.items()) if skipped else "none"
    lines = [
        f"preprocessed {summary['docs']:,} docs from {len(summary['inputs'])} file(s), "
        f"{summary['bytes'] / 2**20:,.1f} MiB, in {summary['elapsed_s']:.1f} s "
        f"(+{summary['setup_s']:.1f} s setup) with {summary['workers']} worker(s)",
        f"  tokens {summary['tokens']:,} ({summary['dtype']}, "
        f"EOD {'appended' if summary['append_eod'] else 'not appended'}), "
        f"characters {summary['characters']:,}, tokens/char {summary['tokens_per_character']:.3f}",
        f"  {summary['docs_per_s']:,.0f} docs/s, {summary['tokens_per_s']:,.0f} tokens/s",
        f"  skipped lines: {skipped_text}",
    ]
    lines += [f"  output: {prefix}.bin/.idx" for prefix in summary["outputs"].values()]
    return "\n".join(lines)
