"""Tokenizers: one small interface over SentencePiece and Hugging Face backends."""

from megatron_ct.tokenizer.base import Tokenizer
from megatron_ct.tokenizer.loader import load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
