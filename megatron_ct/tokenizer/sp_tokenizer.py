"""SentencePiece ``.model`` backend (LLaMA-1/2, Mistral-v1, Ziya, ... layouts)."""

from __future__ import annotations

import os

import sentencepiece

from megatron_ct.tokenizer.base import Tokenizer


def _id_or_none(value: int) -> int | None:
    # SentencePiece reports an absent special piece as -1.
    return None if value < 0 else value


class SentencePieceTokenizer(Tokenizer):
    """Wraps ``sentencepiece.SentencePieceProcessor`` loaded from a model file."""

    def __init__(self, model_path: str) -> None:
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(
                f"{model_path} is not a SentencePiece model file ({first_line}); "
                "expected a SentencePiece .model file or a Hugging Face tokenizer directory"
            ) from None
        eos = _id_or_none(self._sp.eos_id())
        if eos is None:
            raise ValueError(f"SentencePiece model {model_path} has no end-of-sequence piece to use as EOD")
        self.name = f"sentencepiece:{os.path.abspath(model_path)}"
        self.vocab_size = self._sp.get_piece_size()
        self.eod_id = eos
        self.bos_id = _id_or_none(self._sp.bos_id())
        self.pad_id = _id_or_none(self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One native call per batch; num_threads=1 because parallelism comes from
        # worker processes, and SentencePiece's own pool would oversubscribe cores.
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])
