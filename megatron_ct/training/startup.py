"""Start-up: every check that needs the world or files, on every rank, before work is wasted.

Checks that need only the config run where the config is built (:mod:`megatron_ct.config`).
What needs more runs here, in two calls the entry point makes in order:

- :func:`resolve_layout` (before the process group exists): the config against the world
  size, and the device (``parallel.device=cuda`` without a visible GPU, Transformer Engine
  asked for but not usable);
- :func:`check_startup` (after the process group, before anything is built): the checkpoint
  to load (it resolves, its record reads safely, its model, vocabulary and format fit this run,
  and it carries what ``new_blocks``/``new_vocab_rows`` need), the data tokenizer, and every
  training and validation dataset (files present and intact, token ids within the model's
  vocabulary; the one scan per file is cached, rank 0 first), and the attention path that
  document masks need.

Every rank reaches the same verdict and raises the same one-line error
(:class:`~megatron_ct.errors.CTError`), so no rank is left waiting in a collective. The run's
one :class:`~megatron_ct.config.schedule.Schedule` is built here and handed on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch

from megatron_ct.checkpoint.meta import RESUMABLE_FROM, CheckpointMeta, read_meta
from megatron_ct.checkpoint.root import read_tracker, resolve_load_dir
from megatron_ct.cli import check_output_dir
from megatron_ct.config import CTConfig, Layout, validate_for_world
from megatron_ct.config.schedule import Schedule, model_rope
from megatron_ct.data.index_cache import IndexCache, rank0_first
from megatron_ct.errors import CheckpointError, ConfigError, CTError, DataError
from megatron_ct.families.spec import SHAPE_FIELDS

log = logging.getLogger(__name__)


@dataclass
class Startup:
    """What the checks found, for the build."""

    schedule: Schedule
    cache: IndexCache
    load_dir: str | None = None
    meta: CheckpointMeta | None = None
    tokenizer: object | None = None  # megatron_ct.tokenizer.Tokenizer of data.tokenizer
    provenance: dict = field(default_factory=dict)
    downstream_tasks: list = field(default_factory=list)  # loaded data.downstream_tasks


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """'auto' -> this rank's GPU when one is visible, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parallel.device: expected auto or cpu on a machine without a visible CUDA GPU, got cuda")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def resolve_layout(cfg: CTConfig, world_size: int, local_rank: int) -> Layout:
    """The config against the world size, and the device. No collective."""
    from megatron_ct.model.llama import have_transformer_engine

    device = resolve_device(cfg.parallel.device, local_rank)
    if cfg.model.transformer_impl == "transformer_engine" and (device.type != "cuda" or not have_transformer_engine()):
        raise ConfigError(
            "model.transformer_impl: expected local or auto (transformer_engine needs a CUDA device and "
            "transformer_engine installed), got transformer_engine"
        )
    return validate_for_world(cfg, world_size, device)


def check_startup(cfg: CTConfig, layout: Layout) -> Startup:
    """Collective only through the cached dataset scans (rank 0 first). Raises CTError."""
    for key, path in (
        ("checkpoint.save", cfg.checkpoint.save),
        ("logging.log_dir", cfg.logging.log_dir),
        ("logging.tensorboard_dir", cfg.logging.tensorboard_dir),
    ):
        if path:  # a file in the way fails here on every rank, not on rank 0 after the first step
            check_output_dir(path, key)
    out = Startup(schedule=Schedule.from_config(cfg), cache=IndexCache(cfg.data.index_cache_dir))
    if cfg.checkpoint.load:
        out.load_dir, _ = resolve_load_dir(cfg.checkpoint.load)
        out.meta = read_meta(out.load_dir)
        _check_checkpoint_fits(cfg, out.load_dir, out.meta)
        out.provenance = out.meta.provenance()
    _check_save_is_this_runs(cfg, out.load_dir)
    _check_trainable_provenance(out.schedule, out.provenance)
    _check_attention_for_document_masks(cfg, layout)
    if cfg.data.tokenizer:
        out.tokenizer = _load_data_tokenizer(cfg)
    if cfg.data.downstream_tasks:
        out.downstream_tasks = _load_downstream_tasks(cfg)
    if cfg.data.source == "indexed":
        _check_datasets(cfg, out.schedule.names, out.cache)
    return out


def _check_save_is_this_runs(cfg: CTConfig, load_dir: str | None) -> None:
    """A run that does not resume from ``checkpoint.save`` must not write into another run's
    checkpoints: its iteration N would replace theirs and its logs would be appended to
    theirs (one metrics.jsonl holding two runs)."""
    save = cfg.checkpoint.save
    latest = read_tracker(save) if save and os.path.isdir(save) else None
    if latest is None:
        return
    from_save = bool(load_dir) and os.path.realpath(os.path.dirname(load_dir)) == os.path.realpath(save)
    if from_save and not cfg.checkpoint.load_weights_only:
        return  # resuming it: what the root is for
    fix = "checkpoint.load_weights_only=false to resume it" if from_save else f"checkpoint.load={save} to resume it"
    raise ConfigError(
        f"checkpoint.save {save}: holds the checkpoints of an earlier run (latest iteration {latest}) and this run "
        f"starts afresh (iteration 0) instead of resuming it; expected an empty directory, or {fix}"
    )


def startup_preflight(cfg: CTConfig) -> None:
    """Rank 0, at the start of a CT run from a base checkpoint: the pre-flight report's warnings
    as log warnings (no id counting: that scans every dataset; tools/preflight.py does it). A
    report that cannot be made is itself a warning, never a reason to stop: the start-up checks
    above already refused what would break the run."""
    if not (cfg.checkpoint.preflight and cfg.checkpoint.load and cfg.checkpoint.load_weights_only):
        return
    from megatron_ct.training.preflight import log_findings, preflight_for_config

    try:
        report = preflight_for_config(cfg, count_ids=False)
    except (CTError, OSError, ValueError) as e:
        log.warning("pre-flight: skipped (%s)", e)
        return
    log_findings(report, log)


def _check_checkpoint_fits(cfg: CTConfig, path: str, meta: CheckpointMeta) -> None:
    ck = cfg.checkpoint
    saved = meta.model
    for name in SHAPE_FIELDS:
        if name in saved and saved[name] != getattr(cfg.model, name):
            raise ConfigError(
                f"model.{name}: expected {saved[name]!r} (the model of checkpoint {path}), "
                f"got {getattr(cfg.model, name)!r}"
            )
    if meta.true_vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: expected {meta.true_vocab_size} (the vocabulary of checkpoint {path}), "
            f"got {cfg.model.vocab_size}"
        )
    if ck.load_weights_only:
        _warn_if_rope_differs(cfg, path, saved)
        return
    if meta.weights_only:
        raise ConfigError(
            f"checkpoint.load_weights_only: expected true for {path}, which holds weights only "
            "(a converted or expanded model: no optimizer state to resume)"
        )
    if meta.format_version < RESUMABLE_FROM:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.format_version} predates this megatron-ct's optimizer layout; "
            f"expected format {RESUMABLE_FROM} or newer to resume (start from its weights with "
            "checkpoint.load_weights_only=true)"
        )
    saved_dist = bool(meta.config.get("parallel", {}).get("use_distributed_optimizer", False))
    if saved_dist != cfg.parallel.use_distributed_optimizer:
        raise ConfigError(
            f"parallel.use_distributed_optimizer: expected {str(saved_dist).lower()} to resume {path} (its optimizer "
            f"state is saved in that layout), got {str(cfg.parallel.use_distributed_optimizer).lower()}"
        )


def _warn_if_rope_differs(cfg: CTConfig, path: str, saved: dict) -> None:
    """A new run from weights trained with another RoPE (e.g. the end of a long-context stage,
    whose RoPE the checkpoint records) runs with the config's model.* RoPE: allowed, but said."""
    ours = model_rope(cfg.model)
    theirs = (
        float(saved.get("rotary_base", ours[0])),
        saved.get("rope_scaling") if saved.get("rope_scaling") != {"rope_type": "default"} else None,
        saved.get("max_position_embeddings", ours[2]),
    )
    if theirs != ours and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        log.warning(
            "checkpoint %s was trained with RoPE theta %g, rope_scaling %s, max_position_embeddings %d; this run "
            "uses model.rotary_base=%g, model.rope_scaling=%s, model.max_position_embeddings=%d",
            path,
            *theirs,
            *ours,
        )


def _check_trainable_provenance(schedule: Schedule, provenance: dict) -> None:
    """``new_blocks`` / ``new_vocab_rows`` need what the expansion tools record in the checkpoint."""
    needs = {
        "new_blocks": ("new_block_layers", "tools/expand_blocks.py"),
        "new_vocab_rows": ("vocab_expansion", "tools/expand_vocab.py"),
    }
    for stage in schedule.stages:
        for alias, (record, tool) in needs.items():
            if stage.trainable_params and alias in stage.trainable_params and not provenance.get(record):
                raise ConfigError(
                    f"{stage.trainable_key}: '{alias}' needs a checkpoint.load written by {tool} (its metadata "
                    f"records {record}); the loaded checkpoint has none"
                )
            if alias in stage.lr_mult and not provenance.get(record):
                key = f"data.stages[{stage.index}].lr_mult" if schedule.curriculum else "train.lr_mult"
                raise ConfigError(
                    f"{key}.{alias}: needs a checkpoint.load written by {tool} (its metadata records {record}); "
                    "the loaded checkpoint has none"
                )


def _check_attention_for_document_masks(cfg: CTConfig, layout: Layout) -> None:
    """Document masks need an attention backend that applies them (local, sdpa or flex:
    megatron_ct/model/attention.py); Transformer Engine's causal attention ignores them."""
    from megatron_ct.model.attention import choose_attention_backend
    from megatron_ct.model.llama import choose_transformer_impl

    if not cfg.data.uses_document_attention_mask:
        return
    impl = choose_transformer_impl(cfg.model.transformer_impl, layout.device)
    attention = choose_attention_backend(cfg.model.attention_backend, impl, layout.device, document_masks=True)
    if attention == "te":
        i = next(i for i, s in enumerate(cfg.data.stages) if s.reset_attention_mask)
        raise ConfigError(
            f"data.stages[{i}].reset_attention_mask: needs model.attention_backend flex, sdpa or local (they apply "
            f"document masks; Transformer Engine's causal attention ignores them), got {attention}"
        )


def _load_downstream_tasks(cfg: CTConfig) -> list:
    """data.downstream_tasks loaded (a bad task file is one line here, not at the first evaluation),
    with the tokenizer they need and every max_regression name known."""
    from megatron_ct.evaluation.tasks import load_tasks

    d = cfg.data
    if not d.tokenizer:
        raise ConfigError(
            "data.downstream_tasks: needs data.tokenizer (the tasks' text is tokenized for the model), got none"
        )
    tasks = load_tasks(d.downstream_tasks)
    known = set(d.valid) | {t.name for t in tasks}
    for name in d.max_regression:
        if name not in known:
            raise ConfigError(
                f"data.max_regression.{name}: expected a validation set or downstream task "
                f"({', '.join(sorted(known))}), got {name!r}"
            )
    return tasks


def _load_data_tokenizer(cfg: CTConfig):
    from megatron_ct.tokenizer import load_tokenizer

    d = cfg.data
    try:
        tok = load_tokenizer(d.tokenizer)
    except (OSError, ValueError, DataError) as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    # Ids data can hold: added special tokens past the embedding (SmolLM2's FIM tokens) never
    # occur in data, so they do not count.
    if tok.data_vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer: expected at most model.vocab_size={cfg.model.vocab_size} ids, got a tokenizer "
            f"with {tok.data_vocab_size} ({d.tokenizer})"
        )
    return tok


def _check_datasets(cfg: CTConfig, names: list[str], cache: IndexCache) -> None:
    """Every dataset a stage uses and every validation set opens, and its token ids fit the vocabulary."""
    from megatron_ct.data.indexed import check_same_tokenizer
    from megatron_ct.data.stream import DocumentStream

    d = cfg.data
    # The scan reads each file once in order: a training set's up-sampling (which only repeats
    # documents) is dropped here, a validation set's is refused by its stream.
    entries = [(f"data.datasets.{n}", n, replace(d.datasets[n], upsample_long=None)) for n in names]
    entries += [(f"data.valid.{n}", n, ds) for n, ds in d.valid.items()]

    def scan() -> None:
        streams = {
            key: DocumentStream(name, ds, key=key, seed=0, cache=cache, data_root=d.data_root, shuffle=False)
            for key, name, ds in entries
        }
        # One tokenizer for the whole run (from each dataset's sidecar), before the ids are compared.
        check_same_tokenizer({label: m for stream in streams.values() for label, m in stream.metadata().items()})
        for key, stream in streams.items():
            top, prefix = stream.max_token_id()
            if top >= cfg.model.vocab_size:
                raise ConfigError(
                    f"{key}: token id {top} in {prefix} does not fit model.vocab_size={cfg.model.vocab_size} "
                    f"(expected ids < {cfg.model.vocab_size}; tokenized with a different tokenizer?)"
                )

    rank0_first(scan)
