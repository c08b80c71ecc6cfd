"""megatron-ct checkpoint (any TP/PP it was saved at) -> Hugging Face model directory.

Output: ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``,
``config.json`` (architecture, RoPE settings, true vocabulary size: padding rows are not
read), tokenizer and generation files, written into ``OUT.partial`` and renamed to ``OUT``.

Where the HF side comes from, first found wins:
- architecture: ``architecture`` argument, else the ``hf`` record a converted checkpoint
  carries, else the ``hf_base`` directory's config.json, else the first architecture of the
  model's family (megatron_ct/families); it must be one of that family's;
- config.json keys our model does not define (token ids, ...): ``hf_base``'s config.json,
  else the ``hf`` record, else a fresh config;
- tokenizer files: ``tokenizer`` directory, else ``hf_base``, else ``hf_assets/`` beside a
  converted checkpoint. A checkpoint saved by the trainer keeps only our config, so pass
  ``hf_base`` (the model CT started from) to get its token ids and tokenizer back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable

import torch

from megatron_ct.checkpoint import keys
from megatron_ct.checkpoint.dist_io import DistCheckpointReader
from megatron_ct.checkpoint.meta import CheckpointMeta, check_dcp_metadata, read_meta
from megatron_ct.checkpoint.root import resolve_load_dir
from megatron_ct.checkpoint.verify import check_files
from megatron_ct.config import ModelConfig
from megatron_ct.convert import hf_layout as L
from megatron_ct.convert.hf_files import SafetensorsShardWriter, is_weight_file, parse_size
from megatron_ct.convert.hf_to_ct import ConversionReport, parse_dtype, read_hf_config, remove_path
from megatron_ct.convert.progress import Progress, peak_rss_bytes
from megatron_ct.errors import ConversionError, CTError
from megatron_ct.families import family_of
from megatron_ct.families.spec import LAYER_PREFIX, Tensor


class _Source:
    """Reads our tensors for one HF tensor at a time. The last per-layer chunk is kept,
    already split, so q/k/v (gate/up) cost one read of ``linear_qkv`` (``linear_fc1``)."""

    def __init__(self, reader: DistCheckpointReader, m: ModelConfig) -> None:
        self.reader = reader
        self.m = m
        self._cached: tuple[tuple[str, int, int | None] | None, tuple[torch.Tensor, ...]] = (None, ())

    def key(self, t: Tensor) -> str:
        for k in (t.ct_key, *(LAYER_PREFIX + a for a in t.ct_aliases)):
            if k in self.reader.tensors:
                return k
        raise ConversionError(f"{self.reader.path}: missing tensor {t.ct_key}")

    def layer_parts(self, t: Tensor, i: int, e: int | None = None) -> tuple[torch.Tensor, ...]:
        """Layer ``i`` (expert ``e`` of it) of ``t``, split into its HF tensors (shapes without
        the layer and expert axes)."""
        key = self.key(t)
        if self._cached[0] != (key, i, e):
            self._cached = (None, ())  # drop the previous chunk before reading the next
            shape = self.reader.shape(key)
            lead = (i,) if e is None else (i, e)
            x = self.reader.read(key, lead + (0,) * (len(shape) - len(lead)), (1,) * len(lead) + shape[len(lead) :])
            x = x.reshape(shape[len(lead) :])
            if t.kind == "qkv":
                parts = L.split_qkv(x, self.m.num_attention_heads, self.m.num_query_groups)
            elif t.kind == "gate_up":
                parts = L.split_gate_up(x)
            else:
                parts = (x,)
            self._cached = ((key, i, e), parts)
        return self._cached[1]

    def whole(self, t: Tensor, true_vocab: int) -> torch.Tensor:
        """A global tensor; a vocabulary matrix without its padding rows."""
        shape = self.reader.shape(t.ct_key)
        if not t.vocab:
            return self.reader.read(t.ct_key)
        return self.reader.read(t.ct_key, (0,) * len(shape), (true_vocab, *shape[1:]))


def check_ct_tensors(reader: DistCheckpointReader, m: ModelConfig, true_vocab: int) -> int:
    """Shapes against the checkpoint's own config; returns the stored (padded) vocabulary."""
    if keys.EMBEDDING not in reader.tensors:
        raise ConversionError(f"{reader.path}: missing tensor {keys.EMBEDDING}")
    padded = reader.shape(keys.EMBEDDING)[0]
    if padded < true_vocab:
        raise ConversionError(
            f"{reader.path}: {keys.EMBEDDING} has {padded} rows, fewer than the true vocabulary "
            f"size {true_vocab} in the checkpoint metadata"
        )
    family = family_of(m)
    src = _Source(reader, m)
    stored = {t.ct_key: src.key(t) for t in family.layer_tensors(m)}
    for key, shape in family.ct_shapes(m, padded).items():
        stored_key = stored.get(key, key)
        if stored_key not in reader.tensors:
            raise ConversionError(f"{reader.path}: missing tensor {key} (expected from the checkpoint's model config)")
        if reader.shape(stored_key) != shape:
            raise ConversionError(
                f"{reader.path}: tensor {stored_key} has shape {reader.shape(stored_key)}, "
                f"expected {shape} from the checkpoint's model config"
            )
    expected = set(stored.values()) | set(family.ct_shapes(m, padded))
    known = {t.ct_key for t in family.tensors_table} | set(family.ct_aliases())
    extra = sorted(k for k in reader.tensors if k in known and k not in expected)
    if extra:
        raise ConversionError(
            f"{reader.path}: has tensor {extra[0]}, which model.family={family.name} with this config does not have"
        )
    return padded


def plan_hf_tensors(
    reader: DistCheckpointReader, m: ModelConfig, true_vocab: int, dtype: torch.dtype
) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """``(hf_name, shape, produce)`` in write order: embedding, per layer, norm, lm_head."""
    family = family_of(m)
    src = _Source(reader, m)
    shapes = family.hf_shapes(m)
    out = []
    for t in family.tensors(m):
        if not t.per_layer:
            (name,) = t.hf_names()
            out.append((name, shapes[name], lambda t=t: src.whole(t, true_vocab)))
            continue
        for i in range(m.num_layers):
            for e in range(m.num_experts) if t.per_expert else [None]:
                for j, name in enumerate(t.hf_names(i, e)):
                    out.append((name, shapes[name], lambda t=t, i=i, e=e, j=j: src.layer_parts(t, i, e)[j]))
    return [(name, shape, (lambda p=produce: p().to(dtype))) for name, shape, produce in out]


def _assets_beside(iter_path: str) -> str | None:
    """``hf_assets/`` that hf-to-ct wrote next to the iteration directory, if any."""
    candidate = os.path.join(os.path.dirname(os.path.normpath(iter_path)), "hf_assets")
    return candidate if os.path.isdir(candidate) else None


def tokenizer_assets(iter_path: str, record: dict) -> str | None:
    """Tokenizer files stored with a checkpoint: ``hf_assets/`` beside a converted one, else the
    HF model it was converted from (``record``: its ``hf`` metadata), if that still exists."""
    source = record.get("source")
    return _assets_beside(iter_path) or (source if source and os.path.isdir(source) else None)


def _copy_assets(src_dir: str | None, out: str) -> list[str]:
    """Tokenizer/generation files (not weights, not config.json) from ``src_dir``."""
    if not src_dir:
        return []
    copied = []
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) and not is_weight_file(name) and name != "config.json":
            shutil.copy2(path, os.path.join(out, name))
            copied.append(name)
    return copied


def _ours(name: str, asset_names: set[str]) -> bool:
    """A file ct-to-hf writes (so --overwrite may replace it)."""
    weights = name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))
    return weights or name == "config.json" or name in asset_names


def _check_replaceable(out_dir: str, assets: str | None) -> None:
    """--overwrite replaces an earlier export, never a directory holding anything else."""
    asset_names = set(os.listdir(assets)) if assets else set()
    if not os.path.isdir(out_dir):
        raise ConversionError(f"{out_dir}: exists and is not a directory; expected an earlier export to replace")
    foreign = sorted(n for n in os.listdir(out_dir) if not _ours(n, asset_names))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ConversionError(
            f"{out_dir}: holds files this export does not write ({shown}); expected an earlier export "
            "(--overwrite replaces only what ct-to-hf writes): choose another --output or move them"
        )


def convert_ct_to_hf(
    ckpt: str,
    out_dir: str,
    *,
    architecture: str | None = None,
    hf_base: str | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert; raises :class:`ConversionError` on bad input before writing anything."""
    parse_dtype(dtype)  # bad options are refused before the checkpoint is opened
    parse_size(max_shard_size)
    try:
        path, _ = resolve_load_dir(ckpt, key="--input")
        meta = read_meta(path)
        check_files(path)
        check_dcp_metadata(path)
    except CTError as e:
        raise ConversionError(str(e)) from None
    return export_hf(
        DistCheckpointReader(path),
        meta,
        out_dir,
        architecture=architecture,
        hf_base=hf_base,
        tokenizer=tokenizer,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
    )


def export_hf(
    reader: DistCheckpointReader,
    meta: CheckpointMeta,
    out_dir: str,
    *,
    architecture: str | None = None,
    hf_base: str | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Write the HF model of ``reader``'s tensors, which ``meta`` describes.

    ``reader`` is a dist checkpoint's reader or anything that reads like one (``tensors``,
    ``shape``, ``dtype``, region ``read``, ``path``: e.g. a checkpoint merge computed on read);
    tokenizer files are looked for beside ``reader.path`` as for a converted checkpoint.
    """
    t0 = time.perf_counter()
    wanted_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)  # refused before anything is read or written
    path = reader.path
    try:
        m = ModelConfig(**meta.model)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: model config in the checkpoint is not valid here ({e})") from None
    true_vocab = meta.true_vocab_size
    if true_vocab != m.vocab_size:
        raise ConversionError(
            f"{path}: model_info.true_vocab_size={true_vocab} disagrees with config.model.vocab_size={m.vocab_size}"
        )
    record = meta.hf or {}
    base = read_hf_config(hf_base) if hf_base else record.get("config")
    requested = architecture or record.get("architecture") or ((base or {}).get("architectures") or [None])[0]
    arch = L.architecture_for(m, requested, path)
    if base and (base.get("architectures") or [arch])[0] != arch:
        base = None  # keys of another architecture's config would not apply

    check_ct_tensors(reader, m, true_vocab)
    torch_dtype = wanted_dtype or reader.dtype(keys.EMBEDDING)
    tensors = plan_hf_tensors(reader, m, true_vocab, torch_dtype)

    # Tokenizer files: as given, else next to a converted checkpoint, else the HF model it
    # was converted from (the record survives training), if that directory still exists.
    assets = tokenizer or hf_base or tokenizer_assets(path, record)
    if assets and not os.path.isdir(assets):
        raise ConversionError(f"{assets}: no such directory (expected tokenizer files)")
    if os.path.exists(out_dir):
        if not overwrite:
            raise ConversionError(f"{out_dir}: already exists; pass --overwrite to replace it")
        _check_replaceable(out_dir, assets)
    partial = out_dir.rstrip("/") + ".partial"
    remove_path(partial)
    os.makedirs(partial)
    try:
        writer = SafetensorsShardWriter(partial, [(n, s, torch_dtype) for n, s, _ in tensors], shard_bytes)
        bar = Progress(len(tensors), writer.total_bytes, "ct -> hf", enabled=progress)
        largest = 0
        for name, _, produce in tensors:
            t = produce()
            largest = max(largest, t.numel() * t.element_size())
            writer.write(name, t)
            bar.update(t.numel() * t.element_size())
            del t
        writer.close()
        bar.close()
        config = L.hf_config_from_model(m, arch, torch_dtype, base)
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        copied = _copy_assets(assets, partial)
    except BaseException:
        remove_path(partial)  # a failed conversion leaves nothing that looks like output
        raise
    warnings = (
        []
        if any(n.startswith("tokenizer") for n in copied)
        else [f"{out_dir}: no tokenizer files copied; pass --tokenizer DIR (or --hf-base DIR)"]
    )
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(out_dir):
        remove_path(old)
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    remove_path(old)
    return ConversionReport(
        out_dir, len(tensors), writer.total_bytes, largest, time.perf_counter() - t0, peak_rss_bytes(), warnings
    )
