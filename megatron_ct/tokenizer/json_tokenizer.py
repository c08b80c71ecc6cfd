"""``tokenizer.json`` backend: the tokenizers library reads the file exactly as written.

Not ``transformers.AutoTokenizer``: that picks a Python class from ``tokenizer_config.json``,
and a class that does not fit the file rebuilds parts of the pipeline. SmolLM2's config names
``CodeLlamaTokenizer``; transformers 5 then drops the byte-level pre-tokenizer, so spaces
vanish and Chinese becomes the unknown id. Here the normaliser, pre-tokenizer, model and
decoder are the file's own; the special ids come from the model's files
(:mod:`megatron_ct.tokenizer.special_ids`).
"""

from __future__ import annotations

import os

from megatron_ct.errors import DataError
from megatron_ct.tokenizer.base import Tokenizer
from megatron_ct.tokenizer.special_ids import read_special_ids

TOKENIZER_JSON = "tokenizer.json"


class JsonTokenizer(Tokenizer):
    """Wraps ``tokenizers.Tokenizer.from_file(DIR/tokenizer.json)``."""

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = os.path.join(directory, TOKENIZER_JSON)
        try:
            self._tok = RustTokenizer.from_file(path)
        except Exception as exc:  # the Rust side raises plain Exception for a bad file
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{path} is not a readable tokenizer.json ({first_line})") from None
        # Text that spells a special token ("</s>", "<|endoftext|>") is encoded as plain text,
        # as SentencePiece does; otherwise a web page quoting it would plant a fake document
        # boundary. Documents are tokenized whole and chunked later: no truncation, no padding.
        self._tok.encode_special_tokens = True
        self._tok.no_truncation()
        self._tok.no_padding()

        model_vocab = self._tok.get_vocab(with_added_tokens=False)  # token -> id
        added = self._tok.get_added_tokens_decoder()  # id -> AddedToken
        ids = list(model_vocab.values()) + list(added)
        if not ids:
            raise DataError(f"{path}: the tokenizer has no tokens")
        self.vocab_size = max(ids) + 1
        special = read_special_ids(directory, self._tok.token_to_id, self.vocab_size)
        if special.eod_id is None:
            raise DataError(
                f"{directory}: no end-of-sequence token to use as EOD; expected eos_token_id in config.json or "
                "eos_token in tokenizer_config.json"
            )
        self.name = f"hf:{os.path.abspath(directory)} (tokenizer.json)"
        self.eod_id, self.bos_id, self.pad_id = special.eod_id, special.bos_id, special.pad_id
        # The model's id for text it cannot cover (BPE/WordPiece/WordLevel; None with byte fallback):
        # preprocessing reports its share.
        unk = getattr(self._tok.model, "unk_token", None)
        self.unk_id = self._tok.token_to_id(unk) if unk else None
        self.special_sources = special.sources
        # Ids ordinary text can become: the model's vocabulary and non-special added tokens.
        text_ids = list(model_vocab.values()) + [i for i, t in added.items() if not t.special]
        specials = [i for i in (self.eod_id, self.bos_id, self.pad_id) if i is not None]
        self._data_vocab_size = max(text_ids + specials) + 1

    @property
    def data_vocab_size(self) -> int:
        return self._data_vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One native call for the whole list.
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
