"""A deterministic, learnable token stream for smoke tests and the default run.

Tokens follow a fixed random Markov chain in which each token has ``branching``
possible successors, so a model can learn the chain and its loss falls from about
ln(vocab) towards ln(branching). Sample ``i`` depends only on (seed, i): any rank can
build any sample without communication, and a resumed run sees the same samples.
"""

from __future__ import annotations

import numpy as np


class SyntheticMarkovDataset:
    """``dataset[i]`` -> int64 array of ``seq_length + 1`` tokens (inputs plus the next-token label)."""

    def __init__(self, vocab_size: int, seq_length: int, branching: int, seed: int) -> None:
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        rng = np.random.default_rng([seed, 0x5EED])
        # successors[t] = the tokens that may follow t (fixed for the run).
        self.successors = rng.integers(0, vocab_size, size=(vocab_size, branching))
        self.seed = seed

    def __len__(self) -> int:
        return 2**62  # unbounded: sample i exists for every i

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, int(index)])
        choice = rng.integers(0, self.successors.shape[1], size=self.seq_length)
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        out[0] = rng.integers(0, self.vocab_size)
        for j in range(self.seq_length):
            out[j + 1] = self.successors[out[j], choice[j]]
        return out
