"""Tokenize corpora (JSON lines, text, parquet, Hugging Face datasets) into megatron-core
``IndexedDataset`` files.

Pipeline: ``resolve_inputs`` (fail fast on bad paths, columns and options) ->
``select_shard`` (this array task's files and row groups) -> ``read_chunks`` (raw lines or
column values, main process) -> ``ChunkEncoder`` (parse + tokenize, N worker processes,
results consumed in input order so the output is byte-identical for any worker count) ->
``IndexedDatasetWriter`` (temporary names, published at the end, with a ``.meta.json``
sidecar) -> a summary printed by the caller and saved as ``{output_prefix}_summary.json``.

Outputs, one per JSON key (Megatron-LM naming): ``{output_prefix}_{key}_document.bin/.idx``;
in instruction mode a single ``{output_prefix}_instruction_document.bin/.idx``. Shard ``i``
of ``n`` (``--shard-index/--num-shards``, by default SLURM's array task) writes under
``{output_prefix}-{i:05d}-of-{n:05d}`` instead. Each document is one sequence of token ids,
followed by the tokenizer's EOD (the model's EOS) unless ``append_eod`` is off. Ids are
uint16 when the vocabulary has < 65500 entries, else int32 (megatron-core's choice).

A run that would write no document (wrong ``--json-keys``, empty input) is refused and
leaves nothing behind. The share of unknown ids is reported, with a warning above
``UNKNOWN_WARN_SHARE``: a tokenizer that does not fit the text (or is misread) shows there.

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

from megatron_ct.data.indexed import tokenizer_fingerprint
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
from megatron_ct.preprocess.inputs import (
    InputFile,
    PreprocessError,
    Unit,
    check_columns,
    read_chunks,
    resolve_inputs,
    select_shard,
    units_of,
)
from megatron_ct.preprocess.writer import IndexedDatasetWriter, optimal_dtype
from megatron_ct.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["PreprocessConfig", "PreprocessError", "preprocess", "format_summary", "output_prefixes", "shard_prefix"]

UNKNOWN_WARN_SHARE = 0.001
"""Above this share of unknown ids the summary warns (0.1%)."""


@dataclass(kw_only=True)
class PreprocessConfig:
    """Options of one preprocessing run (the CLI flags of ``tools/preprocess_data.py``)."""

    inputs: list[str]
    """Input files, folders or globs: ``.jsonl``/``.json`` (JSON lines) or ``.txt`` (a document per
    line), optionally ``.gz``/``.zst``; ``.parquet``; a ``datasets`` ``save_to_disk`` folder or ``.arrow``."""
    output_prefix: str
    """Outputs are ``{output_prefix}_{key}_document.bin/.idx`` and ``{output_prefix}_summary.json``."""
    tokenizer: str
    """SentencePiece ``.model`` file or Hugging Face tokenizer directory."""
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    """JSON keys (or parquet/Arrow columns) to tokenize, one output each. Plain-text inputs provide only
    ``text``."""
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
    shard_index: int | None = None
    """This task's shard, 0-based (None: ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN``, else 0)."""
    num_shards: int | None = None
    """Shards the inputs are split into, by file and parquet row group (None: ``SLURM_ARRAY_TASK_COUNT``,
    else 1). With more than one, outputs go to ``{output_prefix}-{i:05d}-of-{n:05d}_...``."""

    def __post_init__(self) -> None:
        self.shard_index, self.num_shards = _shard_from_env(self.shard_index, self.num_shards)
        if self.workers < 1:
            raise PreprocessError(f"--workers must be >= 1, got {self.workers}")
        if self.log_interval < 1:
            raise PreprocessError(f"--log-interval must be >= 1, got {self.log_interval}")
        if self.chunk_lines < 1:
            raise PreprocessError(f"chunk_lines must be >= 1, got {self.chunk_lines}")
        if not self.json_keys or not all(self.json_keys) or len(set(self.json_keys)) != len(self.json_keys):
            raise PreprocessError(f"--json-keys must be non-empty and distinct, got {self.json_keys}")
        if self.instruction_keys is not None:
            keys = self.instruction_keys
            if len(keys) != 2 or not all(keys) or keys[0] == keys[1]:
                raise PreprocessError(
                    f"--instruction-keys needs two distinct non-empty keys, got {self.instruction_keys}"
                )
            if self.json_keys != ["text"]:
                raise PreprocessError("--instruction-keys replaces --json-keys; pass only one of them")
            self.instruction_keys = tuple(self.instruction_keys)


def _shard_from_env(index: int | None, count: int | None) -> tuple[int, int]:
    """(shard index, shard count) from the options, else from a SLURM job array, else (0, 1)."""
    env = os.environ
    if count is None:
        count = int(env["SLURM_ARRAY_TASK_COUNT"]) if "SLURM_ARRAY_TASK_COUNT" in env else 1
    if index is None:
        if count > 1 and "SLURM_ARRAY_TASK_ID" in env:
            index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        else:
            index = 0
    if count < 1:
        raise PreprocessError(f"--num-shards must be >= 1, got {count}")
    if not 0 <= index < count:
        raise PreprocessError(
            f"--shard-index {index} (or SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) is outside 0..{count - 1}; "
            "expected a dense job array such as --array=0-N"
        )
    return index, count


def shard_prefix(output_prefix: str, index: int, count: int) -> str:
    """The prefix shard ``index`` of ``count`` writes under (``output_prefix`` itself when unsharded)."""
    return output_prefix if count == 1 else f"{output_prefix}-{index:05d}-of-{count:05d}"


def output_prefixes(config: PreprocessConfig) -> dict[str, str]:
    """Output key -> path prefix of its ``.bin``/``.idx`` pair."""
    keys = [INSTRUCTION_KEY] if config.instruction_keys else config.json_keys
    base = shard_prefix(config.output_prefix, config.shard_index, config.num_shards)
    return {key: f"{base}_{key}_document" for key in keys}


def summary_path(config: PreprocessConfig) -> str:
    return shard_prefix(config.output_prefix, config.shard_index, config.num_shards) + "_summary.json"


def _check_inputs_fit_mode(files: list[InputFile], config: PreprocessConfig) -> None:
    text_files = [f.path for f in files if f.kind == "text"]
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
    files: list[InputFile], units: list[Unit], spec: EncodeSpec, config: PreprocessConfig, tokenizer: Tokenizer
) -> Iterator[EncodedChunk]:
    """Encoded chunks in input order, from this process or a worker pool."""
    chunks = read_chunks(files, units, config.chunk_lines, spec.source_keys)
    # Parallelism comes from worker processes; HF's Rust thread pool would oversubscribe the
    # cores (and warns once it finds itself forked). --workers N means N busy cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config.workers == 1:
        encoder = ChunkEncoder(spec, tokenizer)
        for chunk in chunks:
            yield encoder(chunk, files[chunk.file_index].kind)
        return
    # apply_async with a bounded window rather than Pool.imap: imap's feeder
    # thread would read the whole input into memory ahead of the workers.
    window = 4 * config.workers
    with multiprocessing.Pool(config.workers, initializer=init_worker, initargs=(spec,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_in_worker, (chunk, files[chunk.file_index].kind)))
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
    unknown: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skip_examples: list[str] = field(default_factory=list)
    """``path:line: reason`` of the first few skipped lines."""

    def add(self, enc: EncodedChunk) -> None:
        self.lines += enc.lines
        self.docs += enc.docs
        for key in self.keys:
            self.tokens[key] += len(enc.tokens[key])
            self.characters[key] += enc.characters[key]
            self.unknown[key] += enc.unknown.get(key, 0)
        self.skipped.update(reason for _, reason, _ in enc.skipped)


def _report_skips(enc: EncodedChunk, spec: InputFile, stats: _Stats, config: PreprocessConfig) -> None:
    """Log the run's first ``max_warnings`` skipped lines as ``path:line`` (rows as ``path[row n]``);
    count the rest."""
    already = sum(stats.skipped.values()) - len(enc.skipped)  # stats already include this chunk
    for n, (line_no, reason, detail) in enumerate(enc.skipped, start=already):
        if n < config.max_warnings:
            at = f"{spec.path}[row {line_no}]: skipped row" if spec.columnar else f"{spec.path}:{line_no}: skipped line"
            where = f"{at} ({reason}{': ' + detail if detail else ''})"
            stats.skip_examples.append(where)
            logger.warning("%s", where)
        elif n == config.max_warnings:
            logger.warning("more skipped lines are only counted; see the summary")


def _summary(
    config: PreprocessConfig,
    files: list[InputFile],
    units: list[Unit],
    tokenizer: Tokenizer,
    dtype: type[np.number],
    stats: _Stats,
    setup_s: float,
    elapsed: float,
) -> dict:
    tokens = sum(stats.tokens.values())
    chars = sum(stats.characters.values())
    eod = stats.docs * len(stats.keys) if config.append_eod else 0
    unk = getattr(tokenizer, "unk_id", None)
    unknown = sum(stats.unknown.values()) if unk is not None else None  # None: the tokenizer has no unknown id
    share = None if unknown is None else unknown / tokens if tokens else 0.0
    read = sorted({u.file_index for u in units})
    return {
        "inputs": [files[i].path for i in read],
        "outputs": output_prefixes(config),
        "shard": [config.shard_index, config.num_shards],
        "units": len(units),  # files and parquet row groups read by this shard
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "dtype": np.dtype(dtype).name,
        "append_eod": config.append_eod,
        "workers": config.workers,
        "lines": stats.lines,  # lines or rows read
        "docs": stats.docs,
        "tokens": tokens,  # written ids, EOD included
        "characters": chars,  # of the written documents
        "bytes": sum(u.size for u in units),  # read from disk (compressed size)
        "tokens_per_character": (tokens - eod) / chars if chars else 0.0,  # EOD excluded
        "unk_id": unk,
        "unknown_ids": unknown,
        "unknown_id_share": share,
        "per_key": {
            k: {"tokens": stats.tokens[k], "characters": stats.characters[k], "unknown_ids": stats.unknown[k]}
            for k in stats.keys
        },
        "skipped": {reason: stats.skipped[reason] for reason in SKIP_REASONS if stats.skipped[reason]},
        "skipped_examples": stats.skip_examples,
        "setup_s": round(setup_s, 3),  # input checks, tokenizer load
        "elapsed_s": round(elapsed, 3),  # reading, tokenizing and writing, after setup
        "docs_per_s": stats.docs / elapsed if elapsed else 0.0,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
    }


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _progress_bar(units: list[Unit], config: PreprocessConfig) -> tqdm:
    # Counted in input bytes, so tqdm's rate and ETA follow the bytes read of
    # the total; docs/s and tokens/s ride along in the postfix.
    return tqdm(
        total=sum(u.size for u in units),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="preprocess" if config.num_shards == 1 else f"preprocess {config.shard_index}/{config.num_shards}",
        mininterval=0.5,
        disable=not config.progress,
    )


def _tokenize_and_write(
    files: list[InputFile],
    units: list[Unit],
    spec: EncodeSpec,
    config: PreprocessConfig,
    tokenizer: Tokenizer,
    writer: IndexedDatasetWriter,
    stats: _Stats,
) -> None:
    """The main loop: encoded chunks, in input order, into the writer."""
    start = time.perf_counter()
    next_refresh = config.log_interval
    counts_unknown = getattr(tokenizer, "unk_id", None) is not None
    # closing(): on an error the worker pool is torn down at once, not when the
    # generator happens to be garbage collected.
    with (
        _progress_bar(units, config) as bar,
        logging_redirect_tqdm(),
        closing(_encoded_chunks(files, units, spec, config, tokenizer)) as chunks,
    ):
        for enc in chunks:
            for key in writer.prefixes:
                unknown = enc.unknown.get(key, 0) if counts_unknown else None
                writer.add_documents(key, enc.tokens[key], enc.lengths[key], unknown)
            stats.add(enc)
            _report_skips(enc, files[enc.file_index], stats, config)
            bar.update(enc.bytes_done - bar.n)
            if stats.docs >= next_refresh:
                elapsed = max(time.perf_counter() - start, 1e-9)
                tokens = sum(stats.tokens.values())
                rates = f"{stats.docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tok/s"
                bar.set_postfix_str(rates, refresh=False)  # drawn at tqdm's next mininterval tick
                next_refresh = stats.docs + config.log_interval
        bar.update(bar.total - bar.n)


def _refuse_empty(files: list[InputFile], units: list[Unit], config: PreprocessConfig, stats: _Stats) -> None:
    """No document would be written: say why in one line (nothing is published)."""
    read = sorted({u.file_index for u in units})
    where = (
        f"input {files[read[0]].path}" if len(read) == 1 else f"{len(read)} input files ({files[read[0]].path}, ...)"
    )
    if config.num_shards > 1:
        where += f" of shard {config.shard_index}/{config.num_shards}"
    if stats.lines == 0:
        raise PreprocessError(f"no document to write: {where} has no lines or rows; expected at least one document")
    skipped = ", ".join(f"{r}={n}" for r, n in stats.skipped.items())
    keys = config.instruction_keys or tuple(config.json_keys)
    raise PreprocessError(
        f"no document to write: all {stats.lines} lines/rows of {where} were skipped ({skipped}); expected "
        f"documents under key(s) {', '.join(keys)} (check --json-keys; first: {stats.skip_examples[:1]})"
    )


def preprocess(config: PreprocessConfig) -> dict:
    """Run one preprocessing job (this shard's part of it); return the summary (also saved as JSON).

    Raises:
        PreprocessError: bad inputs, options or tokenizer (raised before any output is
            created), or no document to write (the outputs are removed).
    """
    start = time.perf_counter()
    files = resolve_inputs(config.inputs)
    _check_inputs_fit_mode(files, config)
    source_keys = tuple(config.instruction_keys or config.json_keys)
    check_columns(files, source_keys)
    all_units = units_of(files)
    units = select_shard(all_units, config.shard_index, config.num_shards)
    if config.num_shards > 1:
        logger.info(
            "shard %d of %d: %d of %d units (files, parquet row groups) -> %s_*",
            config.shard_index,
            config.num_shards,
            len(units),
            len(all_units),
            shard_prefix(config.output_prefix, config.shard_index, config.num_shards),
        )
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
    provenance = {"tool": "tools/preprocess_data.py", "shard": [config.shard_index, config.num_shards]}
    setup_done = time.perf_counter()
    with IndexedDatasetWriter(prefixes, dtype, tokenizer_fingerprint(config.tokenizer, tokenizer)) as writer:
        _tokenize_and_write(files, units, spec, config, tokenizer, writer, stats)
        if stats.docs == 0:
            _refuse_empty(files, units, config, stats)
        writer.commit(provenance)
    elapsed = time.perf_counter() - setup_done
    summary = _summary(config, files, units, tokenizer, dtype, stats, setup_done - start, elapsed)
    share = summary["unknown_id_share"]
    if share is not None and share > UNKNOWN_WARN_SHARE:
        logger.warning(
            "%.2f%% of the ids written are the unknown id %d of %s: the tokenizer does not cover this text "
            "(or is misread); expected at most %.1f%%",
            100 * share,
            summary["unk_id"],
            tokenizer.name,
            100 * UNKNOWN_WARN_SHARE,
        )
    summary["summary"] = summary_path(config)
    _write_json(summary["summary"], summary)
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable closing summary of a run."""
    skipped = summary["skipped"]
    skipped_text = ", ".join(f"{r}={n}" for r, n in skipped.items()) if skipped else "none"
    index, count = summary["shard"]
    shard = f" (shard {index} of {count}, {summary['units']} unit(s))" if count > 1 else ""
    share = summary["unknown_id_share"]
    if share is None:
        unknown = "not counted (the tokenizer has no unknown id)"
    else:
        flag = "  <-- WARNING: above 0.1%, wrong or misread tokenizer?" if share > UNKNOWN_WARN_SHARE else ""
        unknown = f"{summary['unknown_ids']:,} ({100 * share:.3f}%, id {summary['unk_id']}){flag}"
    lines = [
        f"preprocessed {summary['docs']:,} docs from {len(summary['inputs'])} file(s){shard}, "
        f"{summary['bytes'] / 2**20:,.1f} MiB, in {summary['elapsed_s']:.1f} s "
        f"(+{summary['setup_s']:.1f} s setup) with {summary['workers']} worker(s)",
        f"  tokens {summary['tokens']:,} ({summary['dtype']}, "
        f"EOD {'id ' + str(summary['eod_id']) + ' appended' if summary['append_eod'] else 'not appended'}), "
        f"characters {summary['characters']:,}, tokens/char {summary['tokens_per_character']:.3f}",
        f"  unknown ids: {unknown}",
        f"  {summary['docs_per_s']:,.0f} docs/s, {summary['tokens_per_s']:,.0f} tokens/s",
        f"  skipped lines: {skipped_text}",
    ]
    lines += [f"  output: {prefix}.bin/.idx" for prefix in summary["outputs"].values()]
    return "\n".join(lines)
