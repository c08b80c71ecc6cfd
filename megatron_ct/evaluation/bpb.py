"""Bits per byte of a model on text: the number CT is judged by, comparable across tokenizers.

Each document is scored on its own as ``[EOS] + tokens``, cut to at most ``seq_length + 1``
tokens, so every kept token of it is predicted (the first one from EOS alone, as at a
document boundary in training). Per input file::

    loss          = summed NLL (nats) / predicted tokens
    bits_per_byte = summed NLL / ln 2 / UTF-8 bytes of the scored text

The scored text of a whole document is the document; of a truncated one, the detokenized
kept tokens (as validation sets count bytes, ``megatron_ct/data/valid.py``).

Two scorers share this (:meth:`megatron_ct.evaluation.session.ModelSession.nll_scorer`): our
checkpoints at any saved layout, run at the launched TP/PP (and DP: batches are dealt
round-robin to data-parallel ranks) under torchrun, and Hugging Face directories in one process.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from megatron_ct.errors import DataError
from megatron_ct.evaluation.session import EvalOptions, open_model
from megatron_ct.tokenizer.base import Tokenizer

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# A scorer takes right-padded token rows [b, s + 1] and returns NLL [b, s] (nats, fp32) on the
# process that reports, None on the others.
Scorer = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class Document:
    """One document ready to score."""

    ids: list[int]
    """``[EOS] + tokens`` cut to ``seq_length + 1``: every id after the first is predicted."""
    bytes: int
    """UTF-8 bytes of the scored text."""


@dataclass(frozen=True)
class InputResult:
    """One JSON line of ``eval_bpb.py``'s output."""

    input: str
    documents: int
    tokens: int
    bytes: int
    loss: float
    bits_per_byte: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


EXPECTED_DOCUMENTS = "JSON lines with a 'text' field (.jsonl/.json) or a document per line"


def read_documents(path: str) -> list[str]:
    """Documents of ``path``: JSON lines with a ``text`` field (``.jsonl``/``.json``, optionally
    ``.gz``), else plain text with one document per line. Blank lines are skipped."""
    opener = gzip.open if path.endswith(".gz") else open
    is_json = path.lower().endswith(JSON_SUFFIXES)
    docs = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip():
                    continue
                if not is_json:
                    docs.append(line)
                    continue
                try:
                    text = json.loads(line).get("text")
                except (ValueError, AttributeError):
                    raise DataError(f"{path}:{n}: not a JSON object; expected JSON lines with a 'text' field") from None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{n}: no string 'text' field; expected JSON lines with a 'text' field")
                if text.strip():
                    docs.append(text)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not docs:
        raise DataError(f"{path}: no non-empty documents to score; expected {EXPECTED_DOCUMENTS}")
    return docs


def prepare(texts: list[str], tokenizer: Tokenizer, seq_length: int) -> list[Document]:
    """Tokenized documents (empty ones dropped: nothing to predict)."""
    out = []
    for start in range(0, len(texts), 1024):
        chunk = texts[start : start + 1024]
        for text, tokens in zip(chunk, tokenizer.encode_batch(chunk), strict=True):
            if not tokens:
                continue
            kept = tokens[:seq_length]
            scored = text if len(kept) == len(tokens) else tokenizer.decode(kept)
            out.append(Document([tokenizer.eod_id, *kept], len(scored.encode("utf-8"))))
    return out


def batches(docs: list[Document], batch_size: int, pad_id: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(document indices, right-padded ids ``[b, s + 1]``), longest documents first so each
    batch pads little; the last batch is filled with copies of one document (ignored)."""
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i].ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [docs[i].ids for i in idx]
        rows += [rows[-1]] * (batch_size - len(rows))
        width = max(len(r) for r in rows)
        # Right padding needs no mask: a causal model never lets a position see later ones.
        yield idx, torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def score(
    docs: list[Document], scorer: Scorer, batch_size: int, *, shard: tuple[int, int] = (0, 1), progress=None
) -> tuple[float, int] | None:
    """(summed NLL in nats, predicted tokens) over ``docs``, or None where the scorer returns None.

    ``shard=(rank, size)``: score only batches ``rank, rank + size, ...`` (data parallelism;
    the caller sums the shards).
    """
    nll_sum, tokens, reporting = 0.0, 0, True
    for k, (idx, ids) in enumerate(batches(docs, batch_size, docs[0].ids[0] if docs else 0)):
        if k % shard[1] != shard[0]:
            continue
        nll = scorer(ids)  # [b, s]
        if nll is None:
            reporting = False
        else:
            for row, i in enumerate(idx):
                n = len(docs[i].ids) - 1
                nll_sum += math.fsum(nll[row, :n].double().tolist())
                tokens += n
        if progress is not None:
            progress.update(len(idx))
    return (nll_sum, tokens) if reporting else None


def result(path: str, docs: list[Document], nll_sum: float, tokens: int) -> InputResult:
    nbytes = sum(d.bytes for d in docs)
    return InputResult(
        input=path,
        documents=len(docs),
        tokens=tokens,
        bytes=nbytes,
        loss=nll_sum / tokens if tokens else float("nan"),
        bits_per_byte=nll_sum / math.log(2) / nbytes if nbytes else float("nan"),
    )


# --- scorers ----------------------------------------------------------------------------


def evaluate(
    checkpoint: str, inputs: list[str], tokenizer: str | None = None, opts: EvalOptions | None = None
) -> list[InputResult] | None:
    """Score every input file; the results on global rank 0, None on other ranks.

    ``checkpoint``: a Hugging Face model directory (scored in this one process) or one of our
    checkpoints (a save root or an ``iter_*`` directory, any saved layout), scored at
    ``opts``' TP/PP by every process of the launch (torchrun, srun, or one plain process).
    ``tokenizer``: default :func:`~megatron_ct.evaluation.session.stored_tokenizer`.
    """
    import torch.distributed as dist

    opts = opts or EvalOptions()
    if not os.path.isdir(checkpoint):
        raise DataError(f"--checkpoint {checkpoint}: no such directory")
    texts = {path: read_documents(path) for path in inputs}  # bad inputs fail before the model loads
    with open_model(checkpoint, tokenizer, opts) as session:
        scorer = session.nll_scorer()
        if session.is_hf:
            return _score_all(texts, session.tokenizer, scorer, opts, shard=(0, 1), reduce=None)

        def reduce(sums: tuple[float, int] | None) -> tuple[float, int]:
            # Reporting ranks (last stage, TP rank 0) of every DP rank add their share.
            t = torch.tensor(sums or (0.0, 0), dtype=torch.float64, device=session.device)
            dist.all_reduce(t)
            return float(t[0]), int(t[1])

        # Batches of micro_batch_size x PP documents keep the pipeline full.
        from megatron.core import parallel_state as ps

        batch = opts.micro_batch_size * ps.get_pipeline_model_parallel_world_size()
        results = _score_all(texts, session.tokenizer, scorer, opts, shard=session.shard, reduce=reduce, batch=batch)
        return results if session.is_main else None


def _score_all(texts, tok, scorer, opts, *, shard, reduce, batch=None) -> list[InputResult]:
    from tqdm import tqdm

    batch = batch or opts.micro_batch_size
    docs = {path: prepare(t, tok, opts.seq_length) for path, t in texts.items()}
    for path, ds in docs.items():
        if not ds:  # before the progress bar, so the error is a line of its own
            raise DataError(f"{path}: no document has a token to score; expected {EXPECTED_DOCUMENTS}")
    show = opts.progress and shard[0] == 0 and int(os.environ.get("RANK", "0")) == 0
    bar = tqdm(total=sum(len(d) for d in docs.values()) // shard[1], unit="doc", desc="bits per byte", disable=not show)
    out = []
    for path, ds in docs.items():
        sums = score(ds, scorer, batch, shard=shard, progress=bar)
        if reduce is not None:
            sums = reduce(sums)
        out.append(result(path, ds, *sums) if sums else None)
    bar.close()
    return out
