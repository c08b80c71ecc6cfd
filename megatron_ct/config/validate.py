"""The parallel layout of a run: the config checked against the world size.

Every rank computes the same verdict from the same config and ``WORLD_SIZE``, so a bad
layout stops all ranks with the same one-line error instead of leaving some of them
waiting in a collective that never completes. The trainer's start-up function
(:func:`megatron_ct.training.startup.check_startup`) calls this with the resolved device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_ct.config.schema import ConfigError, CTConfig


@dataclass(frozen=True)
class Layout:
    """The resolved ``parallel`` section: sizes derived from the world, and the device.

    Builders take their own config section plus this.
    """

    world_size: int
    tp: int
    pp: int
    vpp: int | None
    dp: int
    num_microbatches: int
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where this rank computes: ``cuda:<local rank>`` or ``cpu`` (resolved once at start-up)."""

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def validate_for_world(cfg: CTConfig, world_size: int, device: torch.device | None = None) -> Layout:
    """Raise ConfigError (naming the key and the expected value) or return the layout."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size

    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size*pipeline_model_parallel_size: expected a divisor of the "
            f"world size {world_size}, got {tp}*{pp}={tp * pp}"
        )
    dp = world_size // (tp * pp)
    if m.num_attention_heads % tp != 0:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size: expected a divisor of model.num_attention_heads="
            f"{m.num_attention_heads}, got {tp}"
        )
    if m.num_query_groups % tp != 0:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size: expected a divisor of model.num_query_groups="
            f"{m.num_query_groups}, got {tp}"
        )
    if m.ffn_hidden_size % tp != 0:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size: expected a divisor of model.ffn_hidden_size="
            f"{m.ffn_hidden_size}, got {tp}"
        )
    chunks = pp * (vpp or 1)
    if m.num_layers % chunks != 0:
        key = "virtual_pipeline_model_parallel_size" if vpp else "pipeline_model_parallel_size"
        raise ConfigError(
            f"parallel.{key}: expected pipeline stages x virtual stages ({pp}x{vpp or 1}) to divide "
            f"model.num_layers={m.num_layers}"
        )
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel: expected false when tensor_model_parallel_size is 1, got True")
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size: expected a multiple of micro_batch_size*data_parallel_size="
            f"{t.micro_batch_size}*{dp}={per_step}, got {t.global_batch_size}"
        )
    num_micro = t.global_batch_size // per_step
    if pp > 1 and num_micro < 2:
        raise ConfigError(
            f"train.global_batch_size: pipeline parallelism needs >= 2 micro-batches per step, expected >= "
            f"{2 * per_step}, got {t.global_batch_size}"
        )
    if vpp and num_micro % pp != 0:
        raise ConfigError(
            f"train.global_batch_size: the interleaved schedule needs micro-batches ({num_micro}) to be a "
            f"multiple of pipeline_model_parallel_size={pp}"
        )
    return Layout(
        world_size=world_size,
        tp=tp,
        pp=pp,
        vpp=vpp,
        dp=dp,
        num_microbatches=num_micro,
        sequence_parallel=p.sequence_parallel,
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce,
        device=device or torch.device("cpu"),
    )
