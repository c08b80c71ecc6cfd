"""``load_tokenizer``: read a tokenizer the way its files say, and check every reading agrees.

- A Hugging Face directory with ``tokenizer.json``: the tokenizers library on that file
  (:class:`JsonTokenizer`), never transformers' class choice.
- A directory with only ``tokenizer.model``, or a ``.model`` file: SentencePiece.
- Any other Hugging Face directory (``vocab.json`` + ``merges.txt``, ``vocab.txt``):
  ``transformers.AutoTokenizer``.

EOD, BOS and pad ids of a directory come from ``config.json`` / ``generation_config.json``
when present, else from the tokenizer files (:mod:`megatron_ct.tokenizer.special_ids`).
With ``self_check`` (the default) a probe text is also encoded by every other reading of
the directory (``tokenizer.model`` vs ``tokenizer.json``, and ``AutoTokenizer`` when
``tokenizer_config.json`` exists); a disagreement is a :class:`DataError`
(:mod:`megatron_ct.tokenizer.self_check`).
"""

from __future__ import annotations

import os

from megatron_ct.tokenizer.base import Tokenizer

_EXPECTED = "expected a SentencePiece .model file or a Hugging Face tokenizer directory"
# Any one of these marks a directory transformers can build a tokenizer from.
_HF_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: str | os.PathLike, *, self_check: bool = True) -> Tokenizer:
    """Load a tokenizer from a SentencePiece model file or a HF tokenizer directory.

    ``self_check=False`` skips the comparison with the other readings (worker processes of a
    job whose main process already ran it).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` exists but is neither kind of tokenizer.
        DataError: the directory's files disagree, or name special tokens it lacks.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path} does not exist; {_EXPECTED}")
    if not os.path.isdir(path):
        if path.endswith(".json"):
            raise ValueError(f"{path} is a JSON file; pass the Hugging Face directory that holds it ({_EXPECTED})")
        from megatron_ct.tokenizer.sp_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(path)
    if not any(os.path.exists(os.path.join(path, m)) for m in _HF_MARKERS):
        raise ValueError(f"tokenizer directory {path} has none of {', '.join(_HF_MARKERS)}; {_EXPECTED}")
    from megatron_ct.tokenizer import self_check as check

    has = {name: os.path.isfile(os.path.join(path, name)) for name in _HF_MARKERS}
    if has["tokenizer.json"]:
        from megatron_ct.tokenizer.json_tokenizer import JsonTokenizer

        tok: Tokenizer = JsonTokenizer(path)
        if self_check and has["tokenizer.model"]:
            check.check_sentencepiece_file(path, tok)
        what = "tokenizer.json"
    elif has["tokenizer.model"]:
        from megatron_ct.tokenizer.sp_tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer(os.path.join(path, "tokenizer.model"), model_dir=path)
        what = "tokenizer.model"
    else:
        from megatron_ct.tokenizer.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)  # AutoTokenizer itself: nothing else to compare with
    if self_check and has["tokenizer_config.json"]:
        check.check_auto_tokenizer(path, tok, what)
    return tok
