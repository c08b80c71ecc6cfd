"""Global-batch bookkeeping: which samples form step k, and which of them this rank gets.

Step k uses global samples ``[k*G, (k+1)*G)`` (G = global batch size). They are cut
into ``num_microbatches`` micro-batches; micro-batch j on data-parallel rank r holds
samples ``k*G + j*(mbs*dp) + r*mbs + [0, mbs)``. The loss of a step therefore covers the
same samples whatever the DP size or micro-batch count, which is what makes losses
comparable across parallel layouts and resumable by iteration alone.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from megatron_ct.config import CTConfig, Layout


def sample_indices(step: int, micro: int, dp_rank: int, global_batch: int, mbs: int, dp: int) -> range:
    start = step * global_batch + micro * mbs * dp + dp_rank * mbs
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

    def microbatches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        for j in range(self.num_microbatches):
            idx = sample_indices(step, j, self.dp_rank, self.global_batch, self.mbs, self.dp)
            yield make_batch([self.dataset[i] for i in idx], self.device)

    def consumed_samples(self, step: int) -> int:
        """Data position after ``step`` steps (stored in checkpoints)."""
        return step * self.global_batch


def build_batch_source(cfg: CTConfig, layout: Layout, dp_rank: int, device: str) -> BatchSource:
    from megatron_ct.data.synthetic import SyntheticMarkovDataset

    if cfg.data.source == "synthetic":
        ds = SyntheticMarkovDataset(cfg.model.vocab_size, cfg.data.seq_length, cfg.data.synthetic_branching,
                                    cfg.train.seed)
    else:  # pragma: no cover - guarded by DataConfig validation
        raise ValueError(f"data.source: unsupported {cfg.data.source!r}")
    return BatchSource(cfg, layout, ds, dp_rank, device)
