"""Hugging Face tokenizer-directory backend (``tokenizer.json`` & co.), offline only."""

from __future__ import annotations

import os
import sys

from megatron_ct.tokenizer.base import Tokenizer


class HFTokenizer(Tokenizer):
    """Wraps ``transformers.AutoTokenizer`` loaded from a local directory."""

    def __init__(self, directory: str) -> None:
        # transformers is heavy; import it only when this backend is used.
        from transformers import AutoTokenizer

        try:
            # model_max_length: documents are tokenized whole and chunked later,
            # so the "sequence longer than max length" warning would only be noise.
            self._tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, model_max_length=sys.maxsize)
        except Exception as exc:  # transformers raises many types for a bad directory
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{directory} is not a loadable Hugging Face tokenizer directory ({first_line})") from None
        if self._tok.eos_token_id is None:
            raise ValueError(f"Hugging Face tokenizer {directory} defines no eos_token to use as EOD")
        self.name = f"hf:{os.path.abspath(directory)} ({type(self._tok).__name__})"
        # len() counts added tokens too, i.e. every id the tokenizer can emit;
        # .vocab_size would miss them.
        self.vocab_size = len(self._tok)
        self.eod_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        self.pad_id = self._tok.pad_token_id
        self.unk_id = self._tok.unk_token_id

    # split_special_tokens: text that spells a special token ("</s>",
    # "<|endoftext|>") is encoded as plain text, as SentencePiece does;
    # otherwise a web page quoting "</s>" would plant a fake document boundary.

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Fast (Rust) tokenizers encode a list in one native call.
        out = self._tok(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False)
        return out["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)
