"""SentencePiece ``.model`` backend (LLaMA-1/2, Mistral-v1, Ziya, ... layouts)."""

from __future__ import annotations

import os

import sentencepiece

from megatron_ct.tokenizer.base import Tokenizer
from megatron_ct.tokenizer.special_ids import read_special_ids


def _id_or_none(value: int) -> int | None:
    # SentencePiece reports an absent special piece as -1.
    return None if value < 0 else value


class SentencePieceTokenizer(Tokenizer):
    """Wraps ``sentencepiece.SentencePieceProcessor`` loaded from a model file.

    ``model_dir``: the model directory the file came from; its ``config.json`` /
    ``generation_config.json`` / tokenizer files then set the special ids (see
    :mod:`megatron_ct.tokenizer.special_ids`), the model file's own ids fill the rest.
    """

    def __init__(self, model_path: str, model_dir: str | None = None) -> None:
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(
                f"{model_path} is not a SentencePiece model file ({first_line}); "
                "expected a SentencePiece .model file or a Hugging Face tokenizer directory"
            ) from None
        self.name = f"sentencepiece:{os.path.abspath(model_path)}"
        self.vocab_size = self._sp.get_piece_size()
        own = {
            "eos": _id_or_none(self._sp.eos_id()),
            "bos": _id_or_none(self._sp.bos_id()),
            "pad": _id_or_none(self._sp.pad_id()),
        }
        if model_dir is not None:
            special = read_special_ids(model_dir, self._piece_id, self.vocab_size, defaults=own)
            own = {"eos": special.eod_id, "bos": special.bos_id, "pad": special.pad_id}
        if own["eos"] is None:
            raise ValueError(f"SentencePiece model {model_path} has no end-of-sequence piece to use as EOD")
        self.eod_id, self.bos_id, self.pad_id = own["eos"], own["bos"], own["pad"]
        self.unk_id = _id_or_none(self._sp.unk_id())

    def _piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers the unknown id for a piece it does not have.
        return i if self._sp.id_to_piece(i) == piece else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One native call per batch; num_threads=1 because parallelism comes from
        # worker processes, and SentencePiece's own pool would oversubscribe cores.
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])
