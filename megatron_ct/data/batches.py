"""Global-batch bookkeeping: which samples form step k, and which of them this rank gets.

Step k uses global samples ``[c + (k-r)*G, c + (k-r+1)*G)`` where G is the global batch
size and (r, c) the iteration and consumed-sample count the run resumed from (0, 0 for a
fresh run), so a job chunk that changes G continues the sample stream. They are cut
into ``num_microbatches`` micro-batches; micro-batch j on data-parallel rank r holds
samples ``k*G + j*(mbs*dp) + r*mbs + [0, mbs)``. The loss of a step therefore covers the
same samples whatever the DP size or micro-batch count, which is what makes losses
comparable across parallel layouts and resumable by iteration alone.

Two sources follow this layout: :class:`BatchSource` over the synthetic stream (sample i is
a function of (seed, i)), and :class:`megatron_ct.data.curriculum.CurriculumSource`, which
maps each global sample to a dataset and a position in it (stages, blends, packing).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from megatron_ct.config import CTConfig, Layout


def sample_indices(first_sample: int, micro: int, dp_rank: int, mbs: int, dp: int) -> range:
    """Samples of micro-batch ``micro`` on data-parallel rank ``dp_rank`` of the step whose
    global batch starts at ``first_sample``."""
    start = first_sample + micro * mbs * dp + dp_rank * mbs
    return range(start, start + mbs)


def make_batch(samples: list[np.ndarray], device: str) -> dict[str, torch.Tensor]:
    """Stack ``seq+1``-token samples into model inputs. Shapes: ``[b, s]``."""
    seqs = torch.from_numpy(np.stack(samples))
    tokens = seqs[:, :-1].contiguous()
    labels = seqs[:, 1:].contiguous()
    b, s = tokens.shape
    batch = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(b, s, dtype=torch.float32),
        "position_ids": torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous(),
    }
    if device == "cuda":
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    return batch


class BatchSource:
    """Yields this rank's micro-batches for a given step."""

    def __init__(self, cfg: CTConfig, layout: Layout, dataset, dp_rank: int, device: str) -> None:
        self.dataset = dataset
        self.global_batch = cfg.train.global_batch_size
        self.mbs = cfg.train.micro_batch_size
        self.dp = layout.dp
        self.num_microbatches = layout.num_microbatches
        self.dp_rank = dp_rank
        self.device = device
        self.resumed_step = 0
        self.resumed_samples = 0

    schedule = None  # no curriculum: one endless stream

    def resume(self, step: int, consumed_samples: int, state: dict | None = None) -> None:
        """Continue the stream after ``consumed_samples`` samples, at iteration ``step``.
        (The synthetic stream has no state beyond the sample count; ``state`` is unused.)"""
        self.resumed_step, self.resumed_samples = step, consumed_samples

    def state_dict(self) -> dict | None:
        """Data state for the checkpoint: none beyond consumed_samples."""
        return None

    def close(self) -> None:
        pass

    def consumed_samples(self, step: int) -> int:
        """Data position after ``step`` steps (stored in checkpoints)."""
        return self.resumed_samples + (step - self.resumed_step) * self.global_batch

    def microbatches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        first = self.consumed_samples(step)
        for j in range(self.num_microbatches):
            idx = sample_indices(first, j, self.dp_rank, self.mbs, self.dp)
            yield make_batch([self.dataset[i] for i in idx], self.device)


def build_batch_source(cfg: CTConfig, layout: Layout, dp_rank: int, device: str, log_dir: str | None = None):
    """The synthetic stream, or a curriculum over indexed datasets (data.source='indexed')."""
    from megatron_ct.data.synthetic import SyntheticMarkovDataset

    if cfg.data.source == "indexed":
        from megatron_ct.data.curriculum import CurriculumSource

        return CurriculumSource(cfg, layout, dp_rank, device, log_dir)
    if cfg.data.source == "synthetic":
        ds = SyntheticMarkovDataset(
            cfg.model.vocab_size, cfg.data.seq_length, cfg.data.synthetic_branching, cfg.train.seed
        )
    else:  # pragma: no cover - guarded by DataConfig validation
        raise ValueError(f"data.source: unsupported {cfg.data.source!r}")
    return BatchSource(cfg, layout, ds, dp_rank, device)
