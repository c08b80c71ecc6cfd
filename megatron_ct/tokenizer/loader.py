"""``load_tokenizer``: pick the backend from what the path is."""

from __future__ import annotations

import os

from megatron_ct.tokenizer.base import Tokenizer

_EXPECTED = "expected a SentencePiece .model file or a Hugging Face tokenizer directory"
# Any one of these marks a directory transformers can build a tokenizer from.
_HF_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a SentencePiece model file or a HF tokenizer directory.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` exists but is neither kind of tokenizer.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path} does not exist; {_EXPECTED}")
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, m)) for m in _HF_MARKERS):
            raise ValueError(f"tokenizer directory {path} has none of {', '.join(_HF_MARKERS)}; {_EXPECTED}")
        from megatron_ct.tokenizer.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    if path.endswith(".json"):
        raise ValueError(f"{path} is a JSON file; pass the Hugging Face directory that holds it ({_EXPECTED})")
    from megatron_ct.tokenizer.sp_tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(path)
