"""Train a SentencePiece BPE model on domain text, as a source of pieces to merge.

The trained model is only a piece list for ``merge_sp`` / ``merge_hf``; its ids are never
used. Its pieces must be written the way the base tokenizer writes text, so
:meth:`SPTrainConfig.like` copies the base model's normalisation and splitting rules (a
base that does not fold full-width forms must not get pieces with folded forms).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

import sentencepiece

log = logging.getLogger(__name__)

# SentencePiece's built-in normalisation rules, selectable by name when training.
_BUILTIN_RULES = ("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")


@dataclass(kw_only=True)
class SPTrainConfig:
    """Options of :func:`train_sentencepiece` (SentencePiece trainer flag names)."""

    vocab_size: int = 8000
    """Pieces of the trained model, including its specials and byte pieces; an upper bound
    when the text is too small (``hard_vocab_limit`` is off)."""
    character_coverage: float = 0.9995
    """Fraction of characters covered by single-character pieces (CJK: 0.9995 keeps
    ~99.95% of character occurrences; the rest becomes bytes or ``<unk>``)."""
    byte_fallback: bool = True
    """Spell uncovered characters as UTF-8 byte pieces instead of ``<unk>``."""
    normalization_rule_name: str = "identity"
    """Normalisation applied before training; should match the base model's."""
    add_dummy_prefix: bool = True
    """Treat each line as starting after a space (so word-initial pieces get ``'▁'``)."""
    remove_extra_whitespaces: bool = False
    split_digits: bool = True
    max_sentencepiece_length: int = 16
    input_sentence_size: int = 0
    """Lines sampled for training; 0 uses every line (deterministic)."""
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(
                f"SPTrainConfig.vocab_size={self.vocab_size}; expected >= 300 (byte pieces alone take 256)"
            )
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"SPTrainConfig.character_coverage={self.character_coverage}; expected (0, 1]")
        if self.normalization_rule_name not in _BUILTIN_RULES:
            raise ValueError(
                f"SPTrainConfig.normalization_rule_name={self.normalization_rule_name!r}; expected one of "
                f"{', '.join(_BUILTIN_RULES)}"
            )

    @classmethod
    def like(cls, base_proto, **overrides) -> SPTrainConfig:
        """Config whose text handling copies a base ``ModelProto``'s (overrides win)."""
        norm, trainer = base_proto.normalizer_spec, base_proto.trainer_spec
        inherited = {
            "add_dummy_prefix": norm.add_dummy_prefix,
            "remove_extra_whitespaces": norm.remove_extra_whitespaces,
            "split_digits": trainer.split_digits,
            "max_sentencepiece_length": trainer.max_sentencepiece_length or 16,
            "byte_fallback": trainer.byte_fallback,
        }
        # A custom rule (name "user_defined" or a precompiled map) cannot be named here;
        # identity is then the closest safe choice and is logged.
        if norm.name in _BUILTIN_RULES:
            inherited["normalization_rule_name"] = norm.name
        else:
            log.warning("base normaliser %r is not a built-in rule; training with 'identity'", norm.name)
        return cls(**{**inherited, **overrides})


def train_sentencepiece(input_files: list[str], model_prefix: str, config: SPTrainConfig) -> str:
    """Train a BPE model on text files (one sentence/document per line); returns the .model path."""
    missing = [p for p in input_files if not os.path.isfile(p)]
    if missing or not input_files:
        raise FileNotFoundError(
            f"SentencePiece training text {missing or '(none given)'} not found; expected text files"
        )
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    options = {f.name: getattr(config, f.name) for f in fields(config)}
    try:
        sentencepiece.SentencePieceTrainer.train(
            input=",".join(input_files),
            model_prefix=model_prefix,
            model_type="bpe",
            # Small domain corpora may not reach vocab_size; a soft limit trains what there is.
            hard_vocab_limit=False,
            minloglevel=2,
            **options,
        )
    except RuntimeError as exc:  # e.g. "Vocabulary size is smaller than required_chars"
        reason = str(exc).strip().splitlines()[0]
        raise ValueError(f"SentencePiece training on {', '.join(input_files)} failed: {reason}") from None
    return f"{model_prefix}.model"
