"""A model opened for evaluation: one of our checkpoints at any TP/PP, or a Hugging Face directory.

:func:`open_model` is what every evaluation tool does first (bits per byte, downstream tasks,
the lm-evaluation-harness model): resolve the tokenizer that came with the checkpoint, check it
fits the model's vocabulary, and for our checkpoints set up the process group of the launch
(torchrun, srun or one plain process), build the model at the requested TP/PP and load the
weights from any saved layout. The :class:`ModelSession` it yields hands out scorers:
:meth:`~ModelSession.nll_scorer` (per-token NLL of padded rows, for bits per byte) and
:meth:`~ModelSession.lm` (log-likelihoods and greedy continuations, for downstream tasks).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_ct.errors import DataError
from megatron_ct.tokenizer.base import Tokenizer


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
    """Our checkpoints: PP of this run; world / (TP x PP x CP) data-parallel ranks share the batches."""
    context_parallel_size: int = 1
    """Our checkpoints: CP of this run (each sequence split over this many ranks; long contexts)."""
    precision: str = "auto"
    """'fp32', 'bf16', 'fp16', or 'auto' (bf16 on GPU, fp32 on CPU)."""
    device: str = "auto"
    """'cpu', 'cuda' or 'auto'."""
    progress: bool = True
    """Progress bar (documents, rate, ETA) on the reporting process."""

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> EvalOptions:
        """The options from a tool's parsed flags (``--seq-length`` -> ``seq_length``, ...)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)} | overrides)

    def __post_init__(self) -> None:
        from megatron_ct.config import ConfigError

        sizes = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")
        for key in ("seq_length", "micro_batch_size", *sizes):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')}: expected an integer >= 1, got {getattr(self, key)}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision: expected one of auto, fp32, bf16, fp16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device: expected one of auto, cpu, cuda, got {self.device!r}")


def is_hf_directory(path: str) -> bool:
    """A Hugging Face model directory (config.json, no megatron-ct tracker or dist checkpoint)."""
    from megatron_ct.checkpoint.root import TRACKER

    return (
        os.path.isfile(os.path.join(path, "config.json"))
        and not os.path.isfile(os.path.join(path, TRACKER))
        and not os.path.isfile(os.path.join(path, "metadata.json"))
    )


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


def ct_config(checkpoint: str, opts: EvalOptions, world_size: int):
    from megatron_ct.checkpoint.meta import read_meta
    from megatron_ct.checkpoint.root import resolve_load_dir
    from megatron_ct.config import CTConfig, DataConfig, ModelConfig, ParallelConfig, TrainConfig, validate_for_world
    from megatron_ct.parallel.dims import ParallelDims
    from megatron_ct.parallel.distributed import read_launch_env
    from megatron_ct.training.startup import resolve_device

    path, _ = resolve_load_dir(checkpoint, key="--checkpoint")
    m = ModelConfig(**read_meta(path).model)
    tp, pp, cp = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size, opts.context_parallel_size
    flags = {
        "tp": "--tensor-model-parallel-size",
        "pp": "--pipeline-model-parallel-size",
        "cp": "--context-parallel-size",
    }
    ParallelDims.build(world_size, m, tp=tp, pp=pp, cp=cp, keys=flags)  # the trainer's checks, named by our flags
    device = resolve_device(opts.device, read_launch_env().local_rank)
    precision = opts.precision if opts.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dp, mbs = world_size // (tp * pp * cp), opts.micro_batch_size
    # Rows of any length are scored (padded for CP by megatron_ct.model.inference); the config's
    # length only has to pass the trainer's checks.
    seq = max(2 * cp, min(opts.seq_length, m.max_position_embeddings) // (2 * cp) * (2 * cp))
    cfg = CTConfig(
        model=m,
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp, device=device.type
        ),
        train=TrainConfig(precision=precision, micro_batch_size=mbs, global_batch_size=mbs * dp * max(pp, 2)),
        data=DataConfig(seq_length=seq),
    )
    return cfg, validate_for_world(cfg, world_size, device)


def check_vocab(tok: Tokenizer, rows: int, tok_dir: str, checkpoint: str) -> None:
    if tok.data_vocab_size > rows:
        raise DataError(
            f"--tokenizer {tok_dir}: its ids reach {tok.data_vocab_size - 1} but {checkpoint} has {rows} vocabulary "
            "rows; expected the tokenizer the model was trained with"
        )


@dataclass
class ModelSession:
    """An opened model and what to score it with."""

    checkpoint: str
    tokenizer: Tokenizer
    tokenizer_dir: str
    opts: EvalOptions
    device: torch.device
    hf_model: Any = None
    """The transformers model (a Hugging Face directory), else None."""
    chunks: list = field(default_factory=list)
    """This rank's model chunks (our checkpoint), else empty."""
    vocab_size: int = 0
    max_position_embeddings: int = 0
    meta: Any = None
    """Our checkpoint's CheckpointMeta (iteration, state, provenance), else None."""
    shard: tuple[int, int] = (0, 1)
    """(data-parallel rank, data-parallel size) of this process."""
    is_main: bool = True
    """Global rank 0: the process that writes results."""

    @property
    def is_hf(self) -> bool:
        return self.hf_model is not None

    def nll_scorer(self):
        """Per-token NLL of right-padded rows ``[b, s + 1]`` (nats, fp32 ``[b, s]``) on the reporting
        process (our checkpoints: last pipeline stage, TP and CP rank 0), None on the others."""
        if self.is_hf:
            model, device = self.hf_model, self.device

            def run_hf(ids: torch.Tensor) -> torch.Tensor:
                ids = ids.to(device)
                with torch.no_grad():
                    logits = model(input_ids=ids[:, :-1]).logits.float()  # [b, s, V]
                    logp = torch.log_softmax(logits, dim=-1)
                    return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()  # [b, s]

            return run_hf
        from megatron.core import parallel_state as ps

        from megatron_ct.model.inference import forward_token_nll

        chunks, mbs = self.chunks, self.opts.micro_batch_size

        def run_ct(ids: torch.Tensor) -> torch.Tensor | None:
            nll = forward_token_nll(chunks, ids, mbs)
            reports = ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
            return nll.cpu() if nll is not None and reports else None

        return run_ct

    def lm(self, max_length: int | None = None, beyond_trained: bool = False):
        """The log-likelihood / greedy engine (megatron_ct.evaluation.lm) of this model: inputs
        of ``max_length`` tokens at most, capped at the model's max_position_embeddings unless
        ``beyond_trained`` (long-context probes look past the trained length on purpose)."""
        from megatron_ct.evaluation.lm import CTLM, HFLM

        length = max_length or self.opts.seq_length
        if not beyond_trained:
            length = min(length, self.max_position_embeddings)
        if self.is_hf:
            return HFLM(self.hf_model, length, batch_size=self.opts.micro_batch_size)
        return CTLM(self.chunks, self.vocab_size, length, micro_batch_size=self.opts.micro_batch_size)


@contextmanager
def open_model(
    checkpoint: str, tokenizer: str | None = None, opts: EvalOptions | None = None
) -> Iterator[ModelSession]:
    """Open ``checkpoint`` (a Hugging Face directory, or one of our checkpoints: a save root or an
    ``iter_*`` directory, any saved layout) with ``tokenizer`` (default: :func:`stored_tokenizer`).

    Our checkpoints run at ``opts``' TP/PP on every process of the launch; the process group is
    set up here and torn down on exit. Raises a one-line CTError for a missing checkpoint or
    tokenizer, a tokenizer that does not fit, or a layout the model cannot be split at.
    """
    from megatron_ct.tokenizer import load_tokenizer

    opts = opts or EvalOptions()
    if not os.path.isdir(checkpoint):
        raise DataError(f"--checkpoint {checkpoint}: no such directory")
    tok_dir = tokenizer or stored_tokenizer(checkpoint)
    if tok_dir is None:
        raise DataError(f"--checkpoint {checkpoint}: no tokenizer is stored with it; pass --tokenizer DIR")
    tok = load_tokenizer(tok_dir)

    if is_hf_directory(checkpoint):
        from transformers import AutoModelForCausalLM

        from megatron_ct.dtypes import torch_dtype
        from megatron_ct.training.startup import resolve_device

        device = resolve_device(opts.device, 0)
        precision = opts.precision if opts.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        check_vocab(tok, int(config.get("vocab_size", 0)), tok_dir, checkpoint)
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, local_files_only=True, dtype=torch_dtype(precision, "--precision")
        )
        yield ModelSession(
            checkpoint, tok, tok_dir, opts, device, hf_model=model.to(device).eval(),
            vocab_size=int(config["vocab_size"]),
            max_position_embeddings=int(config.get("max_position_embeddings", opts.seq_length)),
        )  # fmt: skip
        return

    from megatron_ct.checkpoint.manager import load_weights
    from megatron_ct.model.llama import Numerics, build_model
    from megatron_ct.parallel.distributed import init_distributed, read_launch_env, teardown_distributed

    env = read_launch_env()
    cfg, layout = ct_config(checkpoint, opts, env.world_size)
    check_vocab(tok, cfg.model.vocab_size, tok_dir, checkpoint)
    init_distributed(cfg, layout, env)
    try:
        from megatron.core import parallel_state as ps

        chunks, _ = build_model(cfg.model, layout, Numerics(cfg.train.precision))
        meta = load_weights(checkpoint, chunks, key="--checkpoint")
        yield ModelSession(
            checkpoint, tok, tok_dir, opts, layout.device, chunks=chunks, vocab_size=cfg.model.vocab_size,
            max_position_embeddings=cfg.model.max_position_embeddings, meta=meta,
            shard=(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()), is_main=env.rank == 0,
        )  # fmt: skip
    finally:
        teardown_distributed()
