"""Which samples form each step, per data-parallel rank."""

from megatron_ct.config import load_config, validate_for_world
from megatron_ct.data.batches import SyntheticSource, sample_indices
from megatron_ct.data.synthetic import SyntheticMarkovDataset


class IndexDataset:
    def __getitem__(self, i):
        import numpy as np

        return np.full(5, i, dtype=np.int64)


def source(gbs, mbs, world, dp_rank):
    cfg = load_config(None, [f"train.global_batch_size={gbs}", f"train.micro_batch_size={mbs}", "data.seq_length=4"])
    return SyntheticSource(IndexDataset(), validate_for_world(cfg, world), mbs, gbs, dp_rank)


def step_samples(src, step):
    """Samples of ``step`` (the source is advanced to it first)."""
    while src.position.next_step < step:
        src.next_batch()
    return sorted(int(b["tokens"][r, 0]) for b in src.next_batch() for r in range(b["tokens"].shape[0]))


def test_dp_ranks_partition_the_global_batch():
    ranks = [step_samples(source(8, 2, 2, r), step=3) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(24, 32))
    assert not set(ranks[0]) & set(ranks[1])


def test_same_samples_per_step_for_any_dp_size():
    one = step_samples(source(8, 2, 1, 0), step=2)
    four = sorted(sum((step_samples(source(8, 2, 4, r), step=2) for r in range(4)), []))
    assert one == four == list(range(16, 24))


def test_resume_continues_the_stream_when_the_batch_size_changes():
    src = source(16, 2, 1, 0)
    src.load_state_dict({"next_step": 5, "consumed_samples": 5 * 8})  # the first chunk of the job ran with gbs=8
    assert step_samples(src, 5) == list(range(40, 56))
    assert src.progress()["consumed_samples"] == 56 and src.state_dict()["next_step"] == 6


def test_sample_indices_layout():
    assert list(sample_indices(100, micro=1, dp_rank=1, mbs=2, dp=2)) == [106, 107]


def test_synthetic_samples_are_pure_functions_of_seed_and_index():
    a, b = SyntheticMarkovDataset(50, 16, 3, seed=1), SyntheticMarkovDataset(50, 16, 3, seed=1)
    assert (a[12345] == b[12345]).all() and not (a[1] == a[2]).all()
    # Every transition follows the chain: at most `branching` successors per token.
    seq = a[7]
    assert all(seq[j + 1] in a.successors[seq[j]] for j in range(16))
