"""Step metrics: a log line, metrics.jsonl and TensorBoard (when installed). Rank 0 writes."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from megatron_ct.jsonl import JsonlLog
from megatron_ct.training.step import reduce_loss_sums

log = logging.getLogger("megatron_ct")


def memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or this process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class MetricsWriter:
    """Collects per-step metrics and writes them every ``log_interval`` steps."""

    def __init__(self, is_writer: bool, jsonl_dir: str | None, tensorboard_dir: str | None) -> None:
        self.is_writer = is_writer
        self._jsonl = JsonlLog(os.path.join(jsonl_dir, "metrics.jsonl") if is_writer and jsonl_dir else None)
        self._tb = None
        if not is_writer:
            return
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(tensorboard_dir)
            except ImportError:
                log.warning("tensorboard is not installed; logging.tensorboard_dir=%s ignored", tensorboard_dir)

    def write(self, record: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        self._jsonl.write(record)
        if self._tb is not None:
            step = record["iteration"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def format_line(r: dict[str, Any], train_iters: int) -> str:
    """One human-readable line per log interval."""
    eta_s = r.get("eta_s")
    eta = f"{int(eta_s // 3600)}:{int(eta_s % 3600 // 60):02d}:{int(eta_s % 60):02d}" if eta_s is not None else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    gn = r.get("grad_norm")
    return (
        f"iter {r['iteration']:>6}/{train_iters} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | "
        f"grad_norm {gn if gn is None else format(gn, '.3f')} | {r['tokens_per_s']:.0f} tok/s | "
        f"{r['tflops_per_device']:.2f} TFLOP/s/dev | MFU {mfu} | mem {r['memory_gib']:.2f} GiB | "
        f"{r['step_time_s'] * 1000:.0f} ms/step | ETA {eta}"
        + (f" | skipped {r['skipped_steps']}" if r.get("skipped_steps") else "")
        + (f" | moe aux {r['moe_aux_loss']:.4f}" if r.get("moe_aux_loss") is not None else "")
        + (f" | dropped {r['moe_dropped_tokens']}" if r.get("moe_dropped_tokens") else "")
    )


class Throughput:
    """Training time between log points -> tokens/s, TFLOP/s per device, MFU, ETA.

    Each step adds its own tokens and FLOPs (:meth:`step`): a curriculum stage at another
    sequence length changes both. Time spent evaluating or saving checkpoints (``exclude``) is
    not training time: it would make the step after an evaluation look slow and the ETA absurd."""

    def __init__(self, world_size: int, peak_tflops: float | None):
        self.world_size = world_size
        self.peak = peak_tflops
        self.t0 = time.perf_counter()
        self._excluded = 0.0
        self._tokens = self._flops = 0.0

    def step(self, tokens: int, flops: float) -> None:
        """Count one training step of ``tokens`` tokens and ``flops`` FLOPs (the whole model)."""
        self._tokens += tokens
        self._flops += flops

    def exclude(self, seconds: float) -> None:
        """Do not count ``seconds`` (spent on something other than training steps)."""
        self._excluded += seconds

    def measure(self, steps: int, remaining_steps: int) -> dict[str, Any]:
        now = time.perf_counter()
        elapsed = max(now - self.t0 - self._excluded, 1e-9)
        dt = elapsed / max(steps, 1)
        tflops = self._flops / elapsed / self.world_size / 1e12
        out = {
            "step_time_s": dt,
            "tokens_per_s": self._tokens / elapsed,
            "tflops_per_device": tflops,
            "mfu": (tflops / self.peak) if self.peak else None,
            "eta_s": dt * remaining_steps,
        }
        self.t0, self._excluded, self._tokens, self._flops = now, 0.0, 0.0, 0.0
        return out


class LogInterval:
    """The open log interval's loss and token sums, and the count of skipped steps: what the
    next ``metrics.jsonl`` record reports. A checkpoint component, so a run resumed from a save
    inside an interval logs the same mean loss at its end as the run that went on (and keeps
    counting skipped steps), whatever layout it resumes at."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sums = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's [loss sum, tokens]
        self.skipped_steps = 0

    def add(self, loss_sums: torch.Tensor) -> None:
        self.loss_sums += loss_sums  # on the device: reduced on log steps only

    def take(self) -> tuple[float, float]:
        """Collective: the interval's global (loss sum, tokens); the interval starts again."""
        loss_sum, tokens = reduce_loss_sums(self.loss_sums)
        self.loss_sums.zero_()
        return loss_sum, tokens

    def state_dict(self) -> dict:
        """Collective (every rank saves): the interval's global sums; the interval is not cleared."""
        loss_sum, tokens = reduce_loss_sums(self.loss_sums)
        return {"loss_sum": loss_sum, "tokens": tokens, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        """The saved sums become the start of this interval on the ranks whose sums are reduced
        (the last pipeline stage's first data/context-parallel rank, every TP rank of it)."""
        from megatron.core import parallel_state as ps

        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.loss_sums.zero_()
        holds = ps.is_pipeline_last_stage(ignore_virtual=True)
        if holds and ps.get_data_parallel_rank(with_context_parallel=True) == 0:
            saved = [state["loss_sum"], state["tokens"]]
            self.loss_sums += torch.tensor(saved, dtype=torch.float64, device=self.loss_sums.device)
