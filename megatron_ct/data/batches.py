"""What the trainer asks of training data, and the global-batch layout every source follows.

:class:`DataSource` is the whole contract: the trainer calls ``next_batch()`` once per step and
never looks at positions, schedules or caches; the checkpoint saves ``state_dict()`` and
restores it with ``load_state_dict()`` like the model and optimizer. Two sources implement it:
:class:`SyntheticSource` (sample i is a function of (seed, i)) and
:class:`megatron_ct.data.curriculum.CurriculumSource` (stages, blends, packing over indexed
datasets).

Layout: step k uses global samples ``[c + (k-r)*G, c + (k-r+1)*G)`` where G is the global batch
size and (r, c) the step and consumed-sample count the source was last restored at (0, 0 for a
fresh run) -- :class:`SamplePosition`, the one owner of that arithmetic -- so a job chunk that
changes G continues the sample stream. They are cut into ``num_microbatches`` micro-batches;
micro-batch j on data-parallel rank r holds samples ``k*G + j*(mbs*dp) + r*mbs + [0, mbs)``.
The loss of a step therefore covers the same samples whatever the DP size or micro-batch
count, which is what makes losses comparable across parallel layouts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from megatron_ct.config import Layout


class DataSource(Protocol):
    """Training data as the trainer and the checkpoint see it."""

    def next_batch(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next step (``[b, s]`` tensors on the run's device)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here (plain JSON-able values)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()`` of an earlier run."""

    def progress(self) -> dict[str, Any]:
        """Fields for the step's metrics record (e.g. consumed samples)."""

    def close(self) -> None:
        """Release files."""


@dataclass
class SamplePosition:
    """Where the next step's global batch starts in the sample stream."""

    global_batch: int
    next_step: int = 0
    anchor_step: int = 0
    anchor_samples: int = 0

    def first_sample(self, step: int) -> int:
        """Global index of the first sample of ``step``."""
        return self.anchor_samples + (step - self.anchor_step) * self.global_batch

    @property
    def consumed_samples(self) -> int:
        return self.first_sample(self.next_step)

    def state_dict(self) -> dict[str, int]:
        return {"next_step": self.next_step, "consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = self.anchor_step = int(state["next_step"])
        self.anchor_samples = int(state["consumed_samples"])


def sample_indices(first_sample: int, micro: int, dp_rank: int, mbs: int, dp: int) -> range:
    """Samples of micro-batch ``micro`` on data-parallel rank ``dp_rank`` of the step whose
    global batch starts at ``first_sample``."""
    start = first_sample + micro * mbs * dp + dp_rank * mbs
    return range(start, start + mbs)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host batch -> the run's device (pinned, asynchronous copies on GPU; nothing on CPU)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def make_batch(samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Stack ``seq+1``-token samples into model inputs. Shapes: ``[b, s]``."""
    seqs = torch.from_numpy(np.stack(samples))
    tokens = seqs[:, :-1].contiguous()
    labels = seqs[:, 1:].contiguous()
    b, s = tokens.shape
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(b, s, dtype=torch.float32),
        "position_ids": torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous(),
    }


class SyntheticSource:
    """The synthetic stream: sample i is ``dataset[i]``; its state is the sample position."""

    def __init__(self, dataset, layout: Layout, micro_batch_size: int, global_batch_size: int, dp_rank: int) -> None:
        self.dataset = dataset
        self.position = SamplePosition(global_batch_size)
        self.mbs, self.dp, self.dp_rank = micro_batch_size, layout.dims.dp, dp_rank
        self.num_microbatches = layout.num_microbatches
        self.device = layout.device

    def next_batch(self) -> Iterator[dict[str, torch.Tensor]]:
        first = self.position.first_sample(self.position.next_step)
        self.position.next_step += 1
        return self._batches(first)

    def _batches(self, first: int) -> Iterator[dict[str, torch.Tensor]]:
        for j in range(self.num_microbatches):
            idx = sample_indices(first, j, self.dp_rank, self.mbs, self.dp)
            yield to_device(make_batch([self.dataset[i] for i in idx]), self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "synthetic", **self.position.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state)

    def progress(self) -> dict[str, Any]:
        return {"consumed_samples": self.position.consumed_samples}

    def close(self) -> None:
        pass


def build_data_source(cfg, layout: Layout, schedule, dp_rank: int, cache=None, log_dir: str | None = None):
    """The synthetic stream, or a curriculum over indexed datasets (data.source='indexed')."""
    t = cfg.train
    if cfg.data.source == "indexed":
        from megatron_ct.data.curriculum import CurriculumSource

        return CurriculumSource(
            cfg.data, schedule, layout, t.micro_batch_size, t.global_batch_size, t.seed, dp_rank, cache, log_dir
        )
    from megatron_ct.data.synthetic import SyntheticMarkovDataset

    dataset = SyntheticMarkovDataset(cfg.model.vocab_size, cfg.data.seq_length, cfg.data.synthetic_branching, t.seed)
    return SyntheticSource(dataset, layout, t.micro_batch_size, t.global_batch_size, dp_rank)
