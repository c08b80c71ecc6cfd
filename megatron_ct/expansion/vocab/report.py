"""Compression before/after a vocabulary merge, on held-out text.

Tokens per character (lower is better: shorter sequences, cheaper training) and UTF-8
bytes per token (higher is better) of the base and the merged tokenizer, per corpus
(typically held-out domain text, where the merge should help, and general text, where it
should change little).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_ct.tokenizer.base import Tokenizer


@dataclass(frozen=True)
class CorpusCompression:
    """Counts for one corpus; ratios are derived."""

    name: str
    documents: int
    chars: int
    bytes: int
    tokens_before: int
    tokens_after: int

    @property
    def tokens_per_char_before(self) -> float:
        return self.tokens_before / max(self.chars, 1)

    @property
    def tokens_per_char_after(self) -> float:
        return self.tokens_after / max(self.chars, 1)

    @property
    def bytes_per_token_before(self) -> float:
        return self.bytes / max(self.tokens_before, 1)

    @property
    def bytes_per_token_after(self) -> float:
        return self.bytes / max(self.tokens_after, 1)

    def as_dict(self) -> dict:
        ratios = {
            k: round(getattr(self, k), 4)
            for k in (
                "tokens_per_char_before",
                "tokens_per_char_after",
                "bytes_per_token_before",
                "bytes_per_token_after",
            )
        }
        return {**asdict(self), **ratios}


def _count(tokenizer: Tokenizer, texts: list[str], batch: int = 1024) -> int:
    return sum(len(ids) for i in range(0, len(texts), batch) for ids in tokenizer.encode_batch(texts[i : i + batch]))


def measure(name: str, texts: list[str], before: Tokenizer, after: Tokenizer) -> CorpusCompression:
    """Token counts of ``texts`` (one document each) under both tokenizers."""
    return CorpusCompression(
        name=name,
        documents=len(texts),
        chars=sum(len(t) for t in texts),
        bytes=sum(len(t.encode("utf-8")) for t in texts),
        tokens_before=_count(before, texts),
        tokens_after=_count(after, texts),
    )


def compression_report(before: Tokenizer, after: Tokenizer, corpora: dict[str, list[str]], num_new: int) -> dict:
    """JSON-ready report: vocabulary sizes, pieces added, and per-corpus compression."""
    return {
        "vocab_size_before": before.vocab_size,
        "vocab_size_after": after.vocab_size,
        "new_pieces": num_new,
        "corpora": [measure(name, texts, before, after).as_dict() for name, texts in corpora.items()],
    }


def format_report(report: dict) -> str:
    """Human-readable table of :func:`compression_report`'s output."""
    header = (
        f"{'corpus':<16}{'docs':>8}{'chars':>12}{'tok/char before':>17}{'after':>8}{'bytes/tok before':>18}{'after':>8}"
    )
    sizes = f"vocabulary {report['vocab_size_before']} -> {report['vocab_size_after']}"
    lines = [f"{sizes} (+{report['new_pieces']} pieces)", header]
    for c in report["corpora"]:
        lines.append(
            f"{c['name']:<16}{c['documents']:>8}{c['chars']:>12}{c['tokens_per_char_before']:>17.3f}"
            f"{c['tokens_per_char_after']:>8.3f}{c['bytes_per_token_before']:>18.3f}{c['bytes_per_token_after']:>8.3f}"
        )
    return "\n".join(lines)
