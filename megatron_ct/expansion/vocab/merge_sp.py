"""Append pieces to a SentencePiece BPE model file (protobuf), keeping every old id.

The merged model is the base ``ModelProto`` with new ``NORMAL`` pieces appended after the
last id, so old pieces, special pieces and the normaliser are untouched. SentencePiece's
BPE encoder repeatedly joins the adjacent pair whose joined piece has the highest score,
so appended pieces get scores strictly below every existing score (decreasing in append
order): all old merges happen first and new pieces only join what the base model left
apart. Text in which no two adjacent base tokens join into a new piece therefore encodes
exactly as before.
"""

from __future__ import annotations

import os

import numpy as np
import sentencepiece
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from megatron_ct.expansion.vocab.select import MergeResult, Segmenter, choose_new_pieces

NORMAL = sp_pb2.ModelProto.SentencePiece.NORMAL
BPE = sp_pb2.TrainerSpec.BPE


def load_proto(path: str | os.PathLike) -> sp_pb2.ModelProto:
    """Parse a ``.model`` file into its protobuf."""
    proto = sp_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except (OSError, DecodeError) as exc:
        raise ValueError(f"{path} is not a readable SentencePiece model file ({exc})") from None
    if not proto.pieces:
        raise ValueError(f"{path} parses but has no pieces; expected a SentencePiece model file")
    return proto


def save_proto(proto: sp_pb2.ModelProto, path: str | os.PathLike) -> None:
    """Write ``proto`` atomically (a crash never leaves a half-written model)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
    os.replace(tmp, path)


def candidate_pieces(proto: sp_pb2.ModelProto) -> list[str]:
    """The ``NORMAL`` pieces of an addition model, in id order (its merge priority)."""
    return [p.piece for p in proto.pieces if p.type == NORMAL]


def segmenter(proto: sp_pb2.ModelProto) -> Segmenter:
    """Segment piece-form strings exactly as written: no normalisation, no dummy prefix.

    This is how BPE sees a piece's text inside running text, so it gives the base ids a new
    piece replaces (the sources of ``subword_mean`` init) and the segmentations the
    low-frequency filter compares. Unknown characters go to byte pieces (byte fallback) or
    ``<unk>`` as in the model.
    """
    raw = sp_pb2.ModelProto()
    raw.CopyFrom(proto)
    raw.normalizer_spec.name = "identity"
    raw.normalizer_spec.precompiled_charsmap = b""
    raw.normalizer_spec.add_dummy_prefix = False
    raw.normalizer_spec.remove_extra_whitespaces = False
    sp = sentencepiece.SentencePieceProcessor(model_proto=raw.SerializeToString())
    return lambda strings: sp.encode(list(strings))


def append_pieces(base: sp_pb2.ModelProto, pieces: list[str]) -> sp_pb2.ModelProto:
    """Copy of ``base`` with ``pieces`` appended as NORMAL pieces scored below all others."""
    merged = sp_pb2.ModelProto()
    merged.CopyFrom(base)
    # Scores are float32 in the proto; step down one float32 ulp at a time so every new
    # score is distinct and below the old minimum even at -1e9 (LLaMA's whitespace pieces).
    score = np.float32(min(p.score for p in base.pieces))
    lowest = np.float32(-np.inf)
    for piece in pieces:
        score = np.nextafter(score, lowest)
        merged.pieces.add(piece=piece, score=float(score), type=NORMAL)
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged


def merge_sp(
    base: sp_pb2.ModelProto,
    candidates: list[str],
    *,
    max_new: int | None = None,
    protect: list[str] = (),
) -> tuple[sp_pb2.ModelProto, MergeResult]:
    """Merge candidate pieces into a BPE ``base`` model; see ``merge_select`` for the rules.

    Args:
        candidates: pieces in priority order (e.g. ``candidate_pieces(addition_model)``).
        max_new: cap on appended pieces (None: no cap).
        protect: piece-form strings whose segmentation must not change (the
            "low-frequency only" strategy; ``merge_select.frequent_strings`` builds them).
    """
    if base.trainer_spec.model_type != BPE:
        raise ValueError(
            f"base SentencePiece model type is {sp_pb2.TrainerSpec.ModelType.Name(base.trainer_spec.model_type)}; "
            "expected BPE (appending pieces to a unigram model is a different algorithm)"
        )
    vocab = {p.piece for p in base.pieces}
    pieces = choose_new_pieces(
        candidates,
        vocab,
        max_new=max_new,
        protect=protect,
        segment_base=segmenter(base),
        segmenter_for=lambda chosen: segmenter(append_pieces(base, chosen)),
    )
    return append_pieces(base, pieces), MergeResult(new_pieces=pieces, first_new_id=len(base.pieces))


def merge_sp_file(
    base_path: str | os.PathLike, candidates: list[str], out_path: str | os.PathLike, **kwargs
) -> MergeResult:
    """:func:`merge_sp` from and to ``.model`` files; checks the output loads in sentencepiece."""
    merged, result = merge_sp(load_proto(base_path), candidates, **kwargs)
    save_proto(merged, out_path)
    loaded = sentencepiece.SentencePieceProcessor(model_file=os.fspath(out_path))
    if loaded.get_piece_size() != result.vocab_size:
        raise RuntimeError(
            f"{out_path}: sentencepiece loads {loaded.get_piece_size()} pieces, wrote {result.vocab_size}"
        )
    return result
