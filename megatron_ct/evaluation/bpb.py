"""Bits per byte of a model on text: the number CT is judged by, comparable across tokenizers.

Each document is scored on its own as ``[EOS] + tokens``, cut to at most ``seq_length + 1``
tokens, so every kept token of it is predicted (the first one from EOS alone, as at a
document boundary in training). Per input file::

    loss          = summed NLL (nats) / predicted tokens
    bits_per_byte = summed NLL / ln 2 / UTF-8 bytes of the scored text

The scored text of a whole document is the document; of a truncated one, the detokenized
kept tokens (as validation sets count bytes, ``megatron_ct/data/valid.py``).

Two scorers share this: our checkpoints at any saved layout, run at the launched TP/PP
(and DP: batches are dealt round-robin to data-parallel ranks) under torchrun
(:func:`ct_scorer`), and Hugging Face directories in one process (:func:`hf_scorer`).
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


def is_hf_directory(path: str) -> bool:
    """A Hugging Face model directory (config.json, no megatron-ct tracker or dist checkpoint)."""
    from megatron_ct.checkpoint.root import TRACKER

    return (
        os.path.isfile(os.path.join(path, "config.json"))
        and not os.path.isfile(os.path.join(path, TRACKER))
        and not os.path.isfile(os.path.join(path, "metadata.json"))
    )


def hf_scorer(model_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Scorer:
    """Scorer of a transformers causal LM in this process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device).eval()

    def run(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids[:, :-1]).logits.float()  # [b, s, V]
            logp = torch.log_softmax(logits, dim=-1)
            return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()  # [b, s]

    return run


def ct_scorer(chunks: list[torch.nn.Module], micro_batch_size: int) -> Scorer:
    """Scorer of our model chunks (this rank's part of a TP/PP layout); collective over the
    model-parallel group. Returns the NLL on the last pipeline stage's first TP rank."""
    from megatron.core import parallel_state as ps

    from megatron_ct.model.inference import forward_token_nll

    def run(ids: torch.Tensor) -> torch.Tensor | None:
        nll = forward_token_nll(chunks, ids, micro_batch_size)
        return nll.cpu() if nll is not None and ps.get_tensor_model_parallel_rank() == 0 else None

    return run


# --- one call: load, score every input, report -------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """Options of :func:`evaluate` (``tools/eval_bpb.py``'s flags)."""

    seq_length: int = 2048
    """Predicted tokens per document at most (longer documents are cut)."""
    micro_batch_size: int = 4
    """Documents per forward pass (per micro-batch under pipeline parallelism)."""
    tensor_model_parallel_size: int = 1
    """Our checkpoints: TP of this run (any that divides the model; the checkpoint's own is irrelevant)."""
    pipeline_model_parallel_size: int = 1
    """Our checkpoints: PP of this run; world / (TP x PP) data-parallel ranks share the batches."""
    precision: str = "auto"
    """'fp32', 'bf16', 'fp16', or 'auto' (bf16 on GPU, fp32 on CPU)."""
    device: str = "auto"
    """'cpu', 'cuda' or 'auto'."""
    progress: bool = True
    """Progress bar (documents, rate, ETA) on the reporting process."""

    def __post_init__(self) -> None:
        from megatron_ct.config import ConfigError

        for key in ("seq_length", "micro_batch_size", "tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')}: expected an integer >= 1, got {getattr(self, key)}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision: expected one of auto, fp32, bf16, fp16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device: expected one of auto, cpu, cuda, got {self.device!r}")


def stored_tokenizer(checkpoint: str) -> str | None:
    """The tokenizer that came with a checkpoint: the HF directory itself, ``hf_assets/`` beside
    a converted checkpoint, or the HF model a checkpoint was converted from (if it still exists)."""
    if is_hf_directory(checkpoint):
        return checkpoint
    from megatron_ct.checkpoint.meta import read_meta
    from megatron_ct.checkpoint.root import resolve_load_dir
    from megatron_ct.convert.ct_to_hf import tokenizer_assets

    path, _ = resolve_load_dir(checkpoint, key="--checkpoint")
    return tokenizer_assets(path, read_meta(path).hf or {})


def _ct_config(checkpoint: str, opts: EvalOptions, world_size: int):
    from megatron_ct.checkpoint.meta import read_meta
    from megatron_ct.checkpoint.root import resolve_load_dir
    from megatron_ct.config import CTConfig, DataConfig, ModelConfig, ParallelConfig, TrainConfig, validate_for_world
    from megatron_ct.parallel.dims import ParallelDims
    from megatron_ct.parallel.distributed import read_launch_env
    from megatron_ct.training.startup import resolve_device

    path, _ = resolve_load_dir(checkpoint, key="--checkpoint")
    m = ModelConfig(**read_meta(path).model)
    tp, pp = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size
    flags = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size"}
    ParallelDims.build(world_size, m, tp=tp, pp=pp, keys=flags)  # the trainer's checks, named by our flags
    device = resolve_device(opts.device, read_launch_env().local_rank)
    precision = opts.precision if opts.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dp, mbs = world_size // (tp * pp), opts.micro_batch_size
    cfg = CTConfig(
        model=m,
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, device=device.type),
        train=TrainConfig(precision=precision, micro_batch_size=mbs, global_batch_size=mbs * dp * max(pp, 2)),
        data=DataConfig(seq_length=min(opts.seq_length, m.max_position_embeddings)),
    )
    return cfg, validate_for_world(cfg, world_size, device)


def evaluate(
    checkpoint: str, inputs: list[str], tokenizer: str | None = None, opts: EvalOptions | None = None
) -> list[InputResult] | None:
    """Score every input file; the results on global rank 0, None on other ranks.

    ``checkpoint``: a Hugging Face model directory (scored in this one process) or one of our
    checkpoints (a save root or an ``iter_*`` directory, any saved layout), scored at
    ``opts``' TP/PP by every process of the launch (torchrun, srun, or one plain process).
    ``tokenizer``: default :func:`stored_tokenizer`.
    """
    import torch.distributed as dist

    from megatron_ct.tokenizer import load_tokenizer

    opts = opts or EvalOptions()
    if not os.path.isdir(checkpoint):
        raise DataError(f"--checkpoint {checkpoint}: no such directory")
    tok_dir = tokenizer or stored_tokenizer(checkpoint)
    if tok_dir is None:
        raise DataError(f"--checkpoint {checkpoint}: no tokenizer is stored with it; pass --tokenizer DIR")
    tok = load_tokenizer(tok_dir)
    texts = {path: read_documents(path) for path in inputs}

    if is_hf_directory(checkpoint):
        from megatron_ct.training.startup import resolve_device

        device = resolve_device(opts.device, 0)
        precision = opts.precision if opts.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        from megatron_ct.dtypes import torch_dtype

        dtype = torch_dtype(precision, "--precision")
        with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
            _check_vocab(tok, int(json.load(f).get("vocab_size", 0)), tok_dir, checkpoint)
        scorer = hf_scorer(checkpoint, device, dtype)
        return _score_all(texts, tok, scorer, opts, shard=(0, 1), reduce=None)

    from megatron_ct.checkpoint.manager import load_weights
    from megatron_ct.model.llama import Numerics, build_model
    from megatron_ct.parallel.distributed import init_distributed, read_launch_env, teardown_distributed

    env = read_launch_env()
    cfg, layout = _ct_config(checkpoint, opts, env.world_size)
    _check_vocab(tok, cfg.model.vocab_size, tok_dir, checkpoint)
    init_distributed(cfg, layout, env)
    try:
        from megatron.core import parallel_state as ps

        chunks, _ = build_model(cfg.model, layout, Numerics(cfg.train.precision))
        load_weights(checkpoint, chunks, key="--checkpoint")
        scorer = ct_scorer(chunks, opts.micro_batch_size)
        shard = (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())

        def reduce(sums: tuple[float, int] | None) -> tuple[float, int]:
            # Reporting ranks (last stage, TP rank 0) of every DP rank add their share.
            t = torch.tensor(sums or (0.0, 0), dtype=torch.float64, device=layout.device)
            dist.all_reduce(t)
            return float(t[0]), int(t[1])

        # Batches of micro_batch_size x PP documents keep the pipeline full.
        batch = opts.micro_batch_size * layout.dims.pp
        results = _score_all(texts, tok, scorer, opts, shard=shard, reduce=reduce, batch=batch)
        return results if env.rank == 0 else None
    finally:
        teardown_distributed()


def _check_vocab(tok: Tokenizer, rows: int, tok_dir: str, checkpoint: str) -> None:
    if tok.data_vocab_size > rows:
        raise DataError(
            f"--tokenizer {tok_dir}: its ids reach {tok.data_vocab_size - 1} but {checkpoint} has {rows} vocabulary "
            "rows; expected the tokenizer the model was trained with"
        )


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
