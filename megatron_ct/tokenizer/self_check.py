"""Start-up self-check: every reading of a tokenizer directory must give the same ids.

A directory can be read several ways: ``tokenizer.json`` with the tokenizers library (what
megatron-ct uses), ``tokenizer.model`` with SentencePiece, and whatever class
``tokenizer_config.json`` makes ``transformers.AutoTokenizer`` build (what the exported model's
users will get). A probe text is encoded each way that exists; a disagreement is refused in
one line naming the file, before any data is tokenized with ids another tool would read
differently.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from megatron_ct.errors import DataError
from megatron_ct.tokenizer.base import Tokenizer

log = logging.getLogger(__name__)

# English, Chinese, digits and single spaces: what CT corpora mix. No runs of spaces or
# leading space: there SentencePiece and its tokenizer.json conversion legitimately differ.
PROBE = "Hello world, 2024年12月: 这家酒店的服务很好。 Tokens and 数字 3.14!"


def _show(ids: list[int]) -> str:
    return f"{len(ids)} ids {ids[:8]}{'...' if len(ids) > 8 else ''}"


def check_sentencepiece_file(directory: str, primary: Tokenizer) -> None:
    """``tokenizer.model`` next to ``tokenizer.json`` must encode the probe the same way."""
    path = os.path.join(directory, "tokenizer.model")
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError):
        # Not a SentencePiece file (some repositories keep a tiktoken file under this name);
        # nothing reads it as SentencePiece, so there is nothing to disagree with.
        log.info("%s is not a SentencePiece model; not compared with tokenizer.json", path)
        return
    ours, theirs = primary.encode(PROBE), sp.encode(PROBE)
    if ours != theirs:
        raise DataError(
            f"{path}: SentencePiece encodes the probe text {PROBE!r} as {_show(theirs)} but tokenizer.json gives "
            f"{_show(ours)}; expected the two files of one tokenizer"
        )


def _auto_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True, model_max_length=sys.maxsize)


def check_auto_tokenizer(directory: str, primary: Tokenizer, what: str) -> None:
    """``AutoTokenizer`` (the class ``tokenizer_config.json`` names) must agree with ``primary``.

    ``what`` names the file ``primary`` reads, for the message.
    """
    config_path = os.path.join(directory, "tokenizer_config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            cls = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        cls = None
    try:
        auto = _auto_tokenizer(directory)
    except Exception as exc:  # transformers raises many types; it only matters if it loads
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("transformers cannot load %s (%s); not compared with %s", directory, first_line, what)
        return
    theirs = auto.encode(PROBE, add_special_tokens=False, split_special_tokens=True)
    ours = primary.encode(PROBE)
    if ours != theirs:
        raise DataError(
            f"{config_path}: tokenizer_class {cls!r} makes transformers build {type(auto).__name__}, which encodes "
            f"the probe text {PROBE!r} as {_show(theirs)} but {what} gives {_show(ours)}; expected a class that "
            "reads the tokenizer as written (remove tokenizer_class or set it to PreTrainedTokenizerFast)"
        )
