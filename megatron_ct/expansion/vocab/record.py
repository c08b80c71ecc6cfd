"""The ``vocab_expansion`` record: which embedding rows a vocabulary expansion appended.

``train.trainable_params=[new_vocab_rows]`` trains rows ``[old_vocab_size, ...)`` only, so the
record must reach the checkpoint the trainer loads, on both routes:

- ``expand_vocab --ct-checkpoint``: written into the resized checkpoint's ``ct`` metadata
  (:mod:`megatron_ct.expansion.vocab.checkpoint`);
- ``expand_vocab --hf-model``: written as ``vocab_expansion.json`` beside the resized model
  (transformers ignores the file); ``convert_checkpoint.py hf-to-ct`` reads it into the
  converted checkpoint's ``ct`` metadata, and ``ct-to-hf`` copies it back with the other
  non-weight files.
"""

from __future__ import annotations

import json
import os

from megatron_ct.errors import ConversionError

RECORD_FILE = "vocab_expansion.json"
_KEYS = ("old_vocab_size", "new_vocab_size", "init")


def expansion_record(old_vocab_size: int, new_vocab_size: int, init: str, source: str) -> dict:
    """The record as the checkpoint metadata and ``vocab_expansion.json`` hold it."""
    return {
        "source": source,
        "old_vocab_size": int(old_vocab_size),
        "new_vocab_size": int(new_vocab_size),
        "init": init,
    }


def write_hf_record(model_dir: str, record: dict) -> str:
    """Write ``model_dir/vocab_expansion.json`` (temp name, then rename); returns its path."""
    path = os.path.join(model_dir, RECORD_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_hf_record(model_dir: str, vocab_rows: int) -> dict | None:
    """The record beside a HF model with ``vocab_rows`` embedding rows, or None if there is none.

    Raises:
        ConversionError: the file is unreadable or does not fit the model.
    """
    path = os.path.join(model_dir, RECORD_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(record, dict) or any(k not in record for k in _KEYS):
        raise ConversionError(f"{path}: expected a JSON object with keys {', '.join(_KEYS)}")
    old, new = record["old_vocab_size"], record["new_vocab_size"]
    if not (isinstance(old, int) and isinstance(new, int) and 0 < old < new <= vocab_rows):
        raise ConversionError(
            f"{path}: old_vocab_size={old!r}, new_vocab_size={new!r} do not fit the model's {vocab_rows} "
            "vocabulary rows; expected 0 < old_vocab_size < new_vocab_size <= rows (the model expand_vocab.py wrote)"
        )
    return record
