"""The parallel layout of a run: the config checked against the world size.

The parallel dimensions themselves are :class:`~megatron_ct.parallel.dims.ParallelDims`'s
(built and checked once, there); this adds what the batch and the device need.

Every rank computes the same verdict from the same config and ``WORLD_SIZE``, so a bad
layout stops all ranks with the same one-line error instead of leaving some of them
waiting in a collective that never completes. The trainer's start-up function
(:func:`megatron_ct.training.startup.check_startup`) calls this with the resolved device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_ct.config.schema import ConfigError, CTConfig
from megatron_ct.parallel.dims import ParallelDims

if TYPE_CHECKING:  # torch is imported where a layout is built, not where a config is read
    import torch


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass(frozen=True)
class Layout:
    """The resolved ``parallel`` section: the parallel dimensions, the batch split, the device.

    Builders take their own config section plus this.
    """

    dims: ParallelDims
    num_microbatches: int
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    device: torch.device = field(default_factory=_cpu)
    """Where this rank computes: ``cuda:<local rank>`` or ``cpu`` (resolved once at start-up)."""

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def validate_for_world(cfg: CTConfig, world_size: int, device: torch.device | None = None) -> Layout:
    """Raise ConfigError (naming the key and the expected value) or return the layout."""
    t = cfg.train
    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size)
    _check_sequence_lengths(cfg, dims)
    if dims.cp > 1:
        if cfg.data.downstream_tasks:
            raise ConfigError(
                "data.downstream_tasks: expected none under context parallelism (the task scorer runs "
                f"whole sequences; score the checkpoint with tools/eval_tasks.py), got {len(cfg.data.downstream_tasks)}"
            )
    per_step = t.micro_batch_size * dims.dp
    if t.global_batch_size % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size: expected a multiple of micro_batch_size*data_parallel_size="
            f"{t.micro_batch_size}*{dims.dp}={per_step}, got {t.global_batch_size}"
        )
    num_micro = t.global_batch_size // per_step
    if dims.pp > 1 and num_micro < 2:
        raise ConfigError(
            f"train.global_batch_size: pipeline parallelism needs >= 2 micro-batches per step, expected >= "
            f"{2 * per_step}, got {t.global_batch_size}"
        )
    if dims.vpp and num_micro % dims.pp != 0:
        raise ConfigError(
            f"train.global_batch_size: the interleaved schedule needs micro-batches ({num_micro}) to be a "
            f"multiple of pipeline_model_parallel_size={dims.pp}"
        )
    return Layout(
        dims=dims,
        num_microbatches=num_micro,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        device=device or _cpu(),
    )


def _check_sequence_lengths(cfg: CTConfig, dims: ParallelDims) -> None:
    """The run's sequence length and every stage's own split over CP (``2 * cp`` chunks) and, with
    sequence parallelism, each CP rank's share over TP."""
    from megatron_ct.parallel.context import check_sequence_length

    lengths = [("data.seq_length", cfg.data.seq_length)]
    if cfg.data.source == "indexed":
        stages = enumerate(cfg.data.stages)
        lengths += [(f"data.stages[{i}].seq_length", s.seq_length) for i, s in stages if s.seq_length]
    for key, seq in lengths:
        check_sequence_length(seq, dims.cp, key)
        if dims.sequence_parallel and (seq // dims.cp) % dims.tp:
            n = dims.tp * dims.cp
            raise ConfigError(
                f"{key}: expected a multiple of tensor_model_parallel_size x context_parallel_size = {n} with "
                f"parallel.sequence_parallel (each TP rank holds an equal part of the sequence), got {seq}"
            )
