"""The tokenizer interface the rest of megatron-ct codes against.

Data preprocessing, the dataset builders and generation only need a handful of
facts about a tokenizer (its ids for text, its true vocabulary size, its
special ids), so every backend is wrapped into this one small shape instead of
leaking SentencePiece or transformers objects through the code base.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Tokenizer(ABC):
    """Text <-> token ids, plus the special ids training needs.

    Attributes:
        name: Human-readable description (backend and source path), for logs.
        vocab_size: Number of ids the tokenizer knows (max id + 1, added tokens
            included), *not* padded to a multiple of anything; padding for TP
            divisibility is the model's business.
        eod_id: Id appended after every document (the end-of-sequence token).
        bos_id: Beginning-of-sequence id, or None when the tokenizer has none.
        pad_id: Padding id, or None when the tokenizer has none.
        unk_id: Id of unknown text, or None when the tokenizer has none
            (preprocessing reports its share: a high one means the wrong tokenizer).
    """

    name: str
    vocab_size: int
    eod_id: int
    bos_id: int | None
    pad_id: int | None
    unk_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; never adds BOS/EOS (callers decide).

        Text that spells a special token (``"</s>"``) is ordinary text and never
        becomes the special id, so documents cannot forge boundaries.
        """

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` over many texts; backends override to batch in native code."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text for ``ids``; control tokens (BOS/EOD/pad) render as nothing."""

    @property
    def data_vocab_size(self) -> int:
        """1 + the largest id that data made with this tokenizer can hold.

        That is every id :meth:`encode` can return plus the EOD, BOS and pad ids. Added
        special tokens past it never occur in data (``encode`` spells their text as plain
        text), so a model with ``data_vocab_size`` embedding rows can train on such data:
        SmolLM2 has 5 FIM tokens at ids 49152-49156 over a 49152-row embedding.
        """
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"
