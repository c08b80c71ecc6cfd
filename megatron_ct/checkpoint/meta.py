"""The metadata record every checkpoint of ours carries, and safe reading of checkpoint files.

A megatron-core dist checkpoint directory holds tensors (``.metadata`` + ``__*.distcp``), a
``common.pt`` with the non-tensor state, and ``metadata.json``. Our record lives in
``common.pt`` under the key ``ct``; :class:`CheckpointMeta` is its one typed form, written by
the trainer, the converters and the offline tools alike and read back the same way.

Reading is safe against crafted files: ``common.pt`` is loaded with ``weights_only=True``
(plain containers, numbers, strings and tensors only), and DCP's ``.metadata`` pickle is
checked with an unpickler that admits only the checkpoint metadata classes, before torch or
megatron-core open it. A file that is anything else is refused in one line and never executed.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_ct.errors import CheckpointError

FORMAT_VERSION = 3
"""2: the data position lives in the data source's state (``data``), not beside it.
3: every plain component's state (data, evaluator, scheduler, stage...) under ``state``, by the
name it is registered with in the checkpoint manager."""
RESUMABLE_FROM = 2
"""The oldest format a run resumes from (older ones load their weights only)."""
COMMON_FILE = "common.pt"
DCP_METADATA_FILE = ".metadata"
PROVENANCE_KEYS = ("hf", "new_block_layers", "vocab_expansion", "expansion", "merge")


@dataclass
class CheckpointMeta:
    """What a checkpoint's tensors are, where they came from and where training stood."""

    config: dict
    """The run's configuration (``config_to_dict``); its ``model`` section describes the tensors
    and the model as trained up to this iteration (a curriculum stage's ``rotary_base``,
    ``rope_scaling`` and ``max_position_embeddings``), which evaluation and the HF export build."""
    true_vocab_size: int
    """Tokenizer vocabulary; embedding rows beyond it are padding."""
    padded_vocab_size: int
    """Rows of the stored embedding/output matrices."""
    layout: dict = field(default_factory=lambda: {"tp": 1, "pp": 1})
    """TP/PP it was saved at (tensors are global; RNG states are restored only at the same)."""
    iteration: int = 0
    """Training steps done."""
    weights_only: bool = False
    """Converted or derived weights: no optimizer or data state to resume."""
    state: dict | None = None
    """Each plain component's ``state_dict()`` by its registered name (megatron_ct/checkpoint/
    manager.py): ``data`` (position in the sample stream and per dataset), ``evaluator`` (each
    validation set's base-line value), ``scheduler``, ``stage``..."""
    hf: dict | None = None
    """Provenance: the Hugging Face model it was converted from (architecture, config, source)."""
    new_block_layers: list[int] | None = None
    """Provenance: layers added by block expansion (``train.trainable_params=new_blocks``)."""
    vocab_expansion: dict | None = None
    """Provenance: old/new vocabulary sizes of a vocabulary expansion (``new_vocab_rows``)."""
    expansion: dict | None = None
    """Provenance: the block expansion's parameters."""
    merge: dict | None = None
    """Provenance: the checkpoints and weights a merge (tools/merge_checkpoints.py) combined."""
    format_version: int = FORMAT_VERSION

    def provenance(self) -> dict[str, Any]:
        """Where the weights came from; training keeps it in every save."""
        return {k: getattr(self, k) for k in PROVENANCE_KEYS if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form (``common.pt['ct']``)."""
        d = dataclasses.asdict(self)
        d["model_info"] = {"true_vocab_size": d.pop("true_vocab_size"), "padded_vocab_size": d.pop("padded_vocab_size")}
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> CheckpointMeta:
        if not isinstance(d, dict) or "config" not in d or "model_info" not in d:
            raise CheckpointError(
                f"{where}: no megatron-ct metadata ('ct' record with config and model_info); expected a checkpoint "
                "written by pretrain_ct.py or one of its tools"
            )
        d = dict(d)
        version = int(d.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: checkpoint format {version} is newer than this megatron-ct reads ({FORMAT_VERSION}); "
                "expected a checkpoint of this version or older"
            )
        info = d.pop("model_info")
        consumed = d.pop("consumed_samples", None)
        if version == 1 and d.get("data") is None and not d.get("weights_only"):
            # Format 1 kept the sample position beside the data state; it is part of it now.
            d["data"] = {}
        if version == 1 and isinstance(d.get("data"), dict):
            d["data"] = {"next_step": int(d.get("iteration", 0)), "consumed_samples": int(consumed or 0), **d["data"]}
        if version <= 2:  # the data and base-line states were fields of their own
            legacy = {"data": d.pop("data", None), "evaluator": d.pop("evaluation", None)}
            state = {k: v for k, v in legacy.items() if v is not None}
            d["state"] = state or None
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(
                true_vocab_size=int(info["true_vocab_size"]),
                padded_vocab_size=int(info["padded_vocab_size"]),
                **{k: v for k, v in d.items() if k in names},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{where}: malformed megatron-ct metadata ({e}); expected a readable 'ct' record"
            ) from None

    @property
    def model(self) -> dict:
        return self.config["model"]


def load_common(path: str) -> dict[str, Any]:
    """``common.pt`` of a dist checkpoint directory, loaded without executing anything."""
    file = os.path.join(path, COMMON_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing; expected the common state of a dist checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or ["?"])[0]
        raise CheckpointError(
            f"{file}: refused, not plain checkpoint data ({first[:160]}); expected a file written by megatron-ct"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{file}: unreadable ({type(e).__name__}: {str(e)[:160]}); expected a complete file"
        ) from None


def read_meta(path: str) -> CheckpointMeta:
    """The metadata record of the dist checkpoint directory ``path``."""
    return CheckpointMeta.from_dict(load_common(path).get("ct"), path)


# --- DCP .metadata: a pickle; admit only what checkpoint metadata is made of -----------------
_DCP = "torch.distributed.checkpoint"
_ALLOWED = {
    *(
        (f"{_DCP}.metadata", n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    # megatron-core keeps its cached save plans in the metadata.
    *(
        (f"{_DCP}.planner", n)
        for n in (
            "SavePlan",
            "LoadPlan",
            "WriteItem",
            "ReadItem",
            "TensorWriteData",
            "WriteItemType",
            "LoadItemType",
        )
    ),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:  # exact names: no dotted attribute paths
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def check_dcp_metadata(path: str) -> None:
    """Refuse a ``.metadata`` that is not a plain DCP metadata pickle (before torch unpickles it)."""
    file = os.path.join(path, DCP_METADATA_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing; expected the tensor index of a dist checkpoint")
    try:
        with open(file, "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused ({e}); expected DCP checkpoint metadata") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}); expected a complete file") from None
