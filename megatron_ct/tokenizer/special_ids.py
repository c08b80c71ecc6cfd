"""EOD, BOS and pad ids of a tokenizer directory, from the files that define them.

A model directory says which ids its model was trained with in ``config.json`` and
``generation_config.json`` (``eos_token_id``, ``bos_token_id``, ``pad_token_id``); these win,
because they are what the model saw. A tokenizer-only directory names its special tokens as
strings in ``tokenizer_config.json`` or ``special_tokens_map.json``. Each id is taken from the
first file that sets it; ``eos_token_id`` lists (Llama-3.1-Instruct: end of text, end of
message, end of turn) give their first entry, the end-of-text token CT data is joined with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from megatron_ct.errors import DataError

# Model files (ids), then tokenizer files (token strings), highest precedence first.
ID_FILES = ("config.json", "generation_config.json")
TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
ROLES = ("eos", "bos", "pad")


@dataclass(frozen=True)
class SpecialIds:
    """The special ids a run needs and the file each came from (for logs and errors)."""

    eod_id: int | None
    bos_id: int | None
    pad_id: int | None
    sources: dict[str, str]
    """Role ('eos', 'bos', 'pad') -> file name that set it."""


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_string(value) -> str | None:
    """``"</s>"`` or transformers' serialised AddedToken ``{"content": "</s>", ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_special_ids(
    directory: str,
    token_to_id: Callable[[str], int | None],
    vocab_size: int,
    defaults: dict[str, int | None] | None = None,
) -> SpecialIds:
    """Special ids of ``directory``; ``defaults`` (the backend's own) fill roles no file sets.

    Raises:
        DataError: a file is unreadable, names a token the tokenizer lacks, or gives an id
            outside ``[0, vocab_size)``.
    """
    found: dict[str, int] = {}
    sources: dict[str, str] = {}
    for name in ID_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        data = _read_json(path)
        for role in ROLES:
            value = data.get(f"{role}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if role in found or value is None:
                continue
            if not isinstance(value, int) or not 0 <= value < vocab_size:
                raise DataError(
                    f"{path}: {role}_token_id={value!r} is not an id of the tokenizer; expected an integer in "
                    f"[0, {vocab_size})"
                )
            found[role], sources[role] = value, name
    for name in TOKEN_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        data = _read_json(path)
        for role in ROLES:
            token = _token_string(data.get(f"{role}_token"))
            if role in found or token is None:
                continue
            token_id = token_to_id(token)
            if token_id is None:
                raise DataError(f"{path}: {role}_token {token!r} is not a token of the tokenizer")
            found[role], sources[role] = token_id, name
    for role, value in (defaults or {}).items():
        if role not in found and value is not None:
            found[role], sources[role] = value, "tokenizer"
    return SpecialIds(found.get("eos"), found.get("bos"), found.get("pad"), sources)
