"""Hugging Face model directory -> megatron-ct checkpoint (iteration 0, weights only).

Output, in the layout the trainer saves (``checkpoint.load=OUT`` follows the tracker)::

    OUT/iter_0000000/                      megatron-core dist checkpoint (torch_dist)
    OUT/hf_assets/                         the HF directory minus weights: config.json,
                                           tokenizer files, generation_config.json
                                           (and vocab_expansion.json, whose record also goes
                                           into the checkpoint's metadata for new_vocab_rows)
    OUT/model.yaml                         the ``model:`` section of a recipe for this model
    OUT/latest_checkpointed_iteration.txt  written last: its presence means "complete"

A dist checkpoint stores tensors in global coordinates, so one checkpoint loads at every
TP/PP layout; ``target_tp`` / ``target_pp`` are checked against the model (heads, groups,
FFN width and layers must divide) and set the vocabulary padding, which the checkpoint
records next to the true size. The trainer loads it with ``checkpoint.load_weights_only=true``
(there is no optimizer state in it).
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
from dataclasses import dataclass

import torch
import yaml

from megatron_ct.checkpoint.dist_io import ChunkSpec
from megatron_ct.checkpoint.meta import CheckpointMeta
from megatron_ct.checkpoint.rewrite import write_weights_only
from megatron_ct.checkpoint.root import iter_dir, read_tracker
from megatron_ct.config import (
    ConfigError,
    CTConfig,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    config_to_dict,
    validate_for_world,
)
from megatron_ct.convert import hf_layout as L
from megatron_ct.convert.hf_files import HFWeights, is_weight_file
from megatron_ct.convert.progress import Progress, peak_rss_bytes
from megatron_ct.dtypes import DTYPES
from megatron_ct.errors import ConversionError
from megatron_ct.expansion.vocab.record import read_hf_record
from megatron_ct.families import family_of
from megatron_ct.model.llama import padded_vocab_size
from megatron_ct.parallel.dims import ParallelDims


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """``--dtype`` of either direction: None keeps the source's dtype."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype] if dtype else None


@dataclass
class ConversionReport:
    """What a conversion did, for the CLI summary and the benchmark."""

    output: str
    tensors: int
    bytes_written: int
    largest_tensor_bytes: int
    seconds: float
    peak_rss_bytes: int
    warnings: list[str]

    def summary(self) -> str:
        mb = self.bytes_written / 1e6
        return (
            f"wrote {self.output}: {self.tensors} tensors, {mb:.1f} MB in {self.seconds:.1f}s "
            f"({mb / max(self.seconds, 1e-9):.1f} MB/s), largest tensor {self.largest_tensor_bytes / 1e6:.1f} MB, "
            f"peak RSS {self.peak_rss_bytes / 1e6:.0f} MB"
        )


def read_hf_config(hf_dir: str) -> dict:
    import json

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: no such directory (expected a Hugging Face model directory)")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing (a Hugging Face model directory needs config.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def check_layout(m: ModelConfig, tp: int, pp: int) -> CTConfig:
    """The CTConfig recorded in the checkpoint, after the trainer's own divisibility checks."""
    try:
        ParallelDims.build(tp * pp, m, tp=tp, pp=pp, keys={"tp": "--target-tp", "pp": "--target-pp"})
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    cfg = CTConfig(
        model=m,
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        train=TrainConfig(global_batch_size=max(8, 2 * pp)),
        data=DataConfig(seq_length=min(DataConfig().seq_length, m.max_position_embeddings)),
    )
    try:
        validate_for_world(cfg, tp * pp)
    except ConfigError as e:
        raise ConversionError(f"--target-tp {tp} --target-pp {pp}: {e}") from None
    return cfg


def check_hf_tensors(weights: HFWeights, m: ModelConfig, arch: str) -> None:
    """Every expected tensor present with the expected shape, nothing unexplained left over."""
    family = family_of(m)
    expected = family.hf_shapes(m)
    where = weights.directory
    for t in family.global_tensors(m):
        name = t.hf_names()[0]
        if t.vocab and name in weights and weights.shape(name)[0] != m.vocab_size:
            raise ConversionError(
                f"{weights.file_of(name)}: {name} has {weights.shape(name)[0]} rows but config.json "
                f"vocab_size is {m.vocab_size}; they must agree"
            )
    for name, shape in expected.items():
        if name not in weights:
            untied = ", untied lm_head" if name in _tied_output_names(family) else ""
            raise ConversionError(
                f"{where}: missing tensor {name} (expected for {arch} with {m.num_layers} layers{untied})"
            )
        if weights.shape(name) != shape:
            raise ConversionError(
                f"{weights.file_of(name)}: tensor {name} has shape {weights.shape(name)}, "
                f"expected {shape} from config.json"
            )
    # A tied model's checkpoint may still hold the (shared) output matrix.
    tolerated = () if m.untie_embeddings_and_output_weights else _tied_output_names(family)
    for name in weights.names():
        if name in expected or name.endswith(L.IGNORABLE_HF_SUFFIXES) or name in tolerated:
            continue
        raise ConversionError(
            f"{weights.file_of(name)}: unexpected tensor {name} for {arch} (config.json does not account for it)"
        )


def _tied_output_names(family) -> tuple[str, ...]:
    """HF names of the output matrix, which exists only when untied."""
    return tuple(n for t in family.tensors_table if t.role == "output" for n in t.hf_names())


def plan_chunks(weights: HFWeights, m: ModelConfig, padded_vocab: int, dtype: torch.dtype | None) -> list[ChunkSpec]:
    """One chunk per layer per stacked tensor (per layer and expert for expert tensors), plus the
    embedding, final norm and output layer.
    Each chunk's ``produce`` reads its HF tensors, fuses and casts them (never the model)."""
    family = family_of(m)
    shapes = family.ct_shapes(m, padded_vocab)
    fuse = {
        "copy": lambda ts: ts[0],
        "qkv": lambda ts: L.fuse_qkv(*ts, num_query_groups=m.num_query_groups),
        "gate_up": lambda ts: L.fuse_gate_up(*ts),
    }

    def produce(names: tuple[str, ...], t) -> torch.Tensor:
        out = fuse[t.kind]([weights.load(n) for n in names])
        out = out if dtype is None else out.to(dtype)
        return L.pad_vocab(out, padded_vocab) if t.vocab else out

    chunks = []
    for t in family.tensors(m):
        shape = shapes[t.ct_key]
        # A stacked [L, ...] tensor is written one layer per chunk (offset (i, 0, ..), size (1, ...)),
        # an expert tensor [L, E, ...] one expert of a layer per chunk, the others whole.
        for i in range(m.num_layers) if t.per_layer else [None]:
            for e in range(m.num_experts) if t.per_expert else [None]:
                names = t.hf_names(i, e)
                lead = () if i is None else (i,) if e is None else (i, e)
                offsets = lead + (0,) * (len(shape) - len(lead))
                sizes = (1,) * len(lead) + shape[len(lead) :]
                dt = dtype or weights.dtype(names[0])
                chunks.append(ChunkSpec(t.ct_key, shape, offsets, sizes, dt, lambda n=names, t=t: produce(n, t)))
    return chunks


def write_model_yaml(path: str, cfg: CTConfig, out_dir: str) -> None:
    """A recipe fragment: ``pretrain_ct.py --config OUT/model.yaml`` builds this model."""
    model = config_to_dict(cfg)["model"]
    header = (
        f"# Model of the converted checkpoint {os.path.abspath(out_dir)}.\n"
        f"# pretrain_ct.py --config {path} checkpoint.load={os.path.abspath(out_dir)} "
        "checkpoint.load_weights_only=true ...\n"
    )
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump({"model": model}, f, sort_keys=False)


def convert_hf_to_ct(
    hf_dir: str,
    out_dir: str,
    *,
    target_tp: int = 1,
    target_pp: int = 1,
    make_vocab_size_divisible_by: int = 128,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert; raises :class:`ConversionError` on bad input before writing anything."""
    t0 = time.perf_counter()
    torch_dtype = parse_dtype(dtype)
    hf_config = read_hf_config(hf_dir)
    source = os.path.join(hf_dir, "config.json")
    _, arch, m = L.model_config_from_hf(hf_config, source, make_vocab_size_divisible_by)
    cfg = check_layout(m, target_tp, target_pp)
    warnings = [w for w in [L.sliding_window_warning(hf_config, source)] if w]
    weights = HFWeights(hf_dir)
    check_hf_tensors(weights, m, arch)
    # Rows a vocabulary expansion appended (expand_vocab --hf-model): for new_vocab_rows.
    expansion = read_hf_record(hf_dir, m.vocab_size)
    padded = padded_vocab_size(m.vocab_size, make_vocab_size_divisible_by, target_tp)
    chunks = plan_chunks(weights, m, padded, torch_dtype)

    if (read_tracker(out_dir) is not None or os.path.exists(iter_dir(out_dir, 0))) and not overwrite:
        raise ConversionError(f"{out_dir}: already holds a checkpoint; pass --overwrite to replace it")
    meta = CheckpointMeta(
        config=config_to_dict(cfg),
        true_vocab_size=m.vocab_size,
        padded_vocab_size=padded,
        layout={"tp": target_tp, "pp": target_pp},
        weights_only=True,
        hf={"architecture": arch, "config": hf_config, "source": os.path.abspath(hf_dir)},
        vocab_expansion=expansion,
    )
    pickle.dumps(meta.to_dict())  # fail here, not half-way, if config.json held something odd
    os.makedirs(out_dir, exist_ok=True)
    # Beside the checkpoint, before it is published (the tracker, written last, means complete).
    assets = os.path.join(out_dir, "hf_assets")
    remove_path(assets + ".partial")
    os.makedirs(assets + ".partial")
    for name in sorted(os.listdir(hf_dir)):
        src = os.path.join(hf_dir, name)
        if os.path.isfile(src) and not is_weight_file(name):
            shutil.copy2(src, os.path.join(assets + ".partial", name))
    remove_path(assets)
    os.replace(assets + ".partial", assets)
    write_model_yaml(os.path.join(out_dir, "model.yaml"), cfg, out_dir)
    bar = Progress(len(chunks), sum(c.nbytes for c in chunks), "hf -> ct", enabled=progress)
    write_weights_only(out_dir, chunks, meta, overwrite=True, on_written=lambda c: bar.update(c.nbytes))
    bar.close()
    return ConversionReport(
        out_dir,
        len(chunks),
        sum(c.nbytes for c in chunks),
        max(c.nbytes for c in chunks),
        time.perf_counter() - t0,
        peak_rss_bytes(),
        warnings,
    )


def remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
