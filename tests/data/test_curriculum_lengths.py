"""Per-stage sequence length and RoPE in a curriculum, without a model: the stage keys and their
errors, token-sized stages counted at their own length, and the data re-packed at a new length
continuing every dataset's stream exactly where the stage before stopped (also on resume)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from megatron_ct.config import ConfigError, validate_for_world
from megatron_ct.config.loader import build_config
from megatron_ct.config.schedule import Schedule
from megatron_ct.data.batches import build_data_source, sample_indices
from megatron_ct.data.index_cache import IndexCache
from megatron_ct.preprocess.writer import IndexedDatasetWriter

GBS, MBS = 4, 2
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}


def two_stages(packing: str = "concat", **long) -> list[dict]:
    """3 steps at data.seq_length (32), then 3 at 64 with a new theta (and ``long``'s keys)."""
    blend = {"a": 0.5, "b": 0.5}
    long = {"seq_length": 64, "rotary_base": 1e6, **long}
    return [
        {"name": "short", "iters": 3, "blend": blend, "packing": packing},
        {"name": "long", "iters": 3, "blend": blend, "packing": packing, **long},
    ]


def make_cfg(prefixes: dict, stages: list[dict], world: int = 1, **sections):
    raw = {
        "train": {"global_batch_size": GBS, "micro_batch_size": MBS, "train_iters": 6},
        "data": {"seq_length": 32, "datasets": prefixes, "stages": stages},
        "model": {"max_position_embeddings": 64, "vocab_size": 500},
        **sections,
    }
    cfg = build_config(raw)
    return cfg, validate_for_world(cfg, world)


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory) -> dict[str, str]:
    """Two datasets of random documents (1-90 tokens, vocabulary 500)."""
    root = tmp_path_factory.mktemp("lengths")
    out = {}
    for seed, name in enumerate(("a", "b")):
        rng = np.random.default_rng(seed)
        docs = [rng.integers(0, 500, rng.integers(1, 90)) for _ in range(120)]
        prefix = os.path.join(root, f"{name}_text_document")
        with IndexedDatasetWriter({"t": prefix}, np.uint16) as w:
            w.add_documents("t", np.concatenate(docs).astype(np.uint16), np.array([len(d) for d in docs]))
            w.commit()
        out[name] = prefix
    return out


def source(cfg, layout, tmp_path):
    cfg.data.index_cache_dir = str(tmp_path / "cache")
    return build_data_source(cfg, layout, Schedule.from_config(cfg), 0, IndexCache(cfg.data.index_cache_dir))


def test_stages_carry_their_length_and_rope_forward(prefixes):
    stages = two_stages(rope_scaling=YARN, max_position_embeddings=128)
    stages.append({"name": "anneal", "iters": 2, "blend": {"a": 1.0}})
    stages.append({"name": "plain", "blend": {"a": 1.0}, "rope_scaling": {"rope_type": "default"}})
    cfg, _ = make_cfg(prefixes, stages, train={"train_iters": 9, "global_batch_size": GBS, "micro_batch_size": MBS})
    got = [(s.seq_length, s.rope) for s in Schedule.from_config(cfg).stages]
    assert got == [
        (32, (10000.0, None, 64)),  # the run's: data.seq_length and model.*
        (64, (1e6, YARN, 128)),
        (64, (1e6, YARN, 128)),  # carried over from the stage before
        (64, (1e6, None, 128)),  # {rope_type: default}: plain RoPE again
    ]


def test_token_sized_stages_count_at_their_own_length(prefixes):
    tokens = 3 * GBS * 64  # 3 steps at 64 (6 at the run's 32)
    stages = [
        {"name": "short", "tokens": "2.56e2", "blend": {"a": 1.0}},  # YAML 1.1 reads 2.56e2 as a string
        {"name": "long", "tokens": tokens, "seq_length": 64, "rotary_base": "1e6", "blend": {"a": 1.0}},
    ]
    cfg, _ = make_cfg(prefixes, stages, train={"train_iters": 5, "global_batch_size": GBS, "micro_batch_size": MBS})
    got = [(s.start_iter, s.end_iter, s.rotary_base) for s in Schedule.from_config(cfg).stages]
    assert got == [(0, 2, 10000.0), (2, 5, 1e6)]


@pytest.mark.parametrize("packing", ["concat", "by_source"])
def test_a_longer_stage_repacks_each_stream_where_the_stage_before_stopped(prefixes, tmp_path, packing):
    cfg, layout = make_cfg(prefixes, two_stages(packing))
    src, planner = source(cfg, layout, tmp_path), source(cfg, layout, tmp_path)  # in lockstep
    names = src.schedule.names
    expected = dict.fromkeys(names, 0)  # each dataset's position: every sample starts there
    for step in range(6):
        window, _, refs = planner.plan()  # where each sample of the step comes from
        batches = list(src.next_batch())
        seq = 32 if step < 3 else 64
        assert window.stage.seq_length == seq
        for r in refs:
            name = names[r.dataset]
            assert r.position == expected[name], f"step {step + 1}: {name} repeated or skipped data"
            if packing == "concat":
                assert (r.length, r.next_position - r.position) == (seq + 1, seq)
            else:  # whole documents up to the pack bound at this length
                assert r.length <= seq + 1 and r.next_position == r.position + r.length
            expected[name] = r.next_position
        for j, batch in enumerate(batches):
            assert batch["tokens"].shape == (MBS, seq)
            for row, i in enumerate(sample_indices(0, j, 0, MBS, 1)):
                r = refs[i]
                window_tokens = src.streams[names[r.dataset]].read(r.position, r.length).tokens
                assert batch["tokens"][row, : r.length - 1].tolist() == window_tokens[:-1].tolist()
    assert src.positions == expected
    if packing == "by_source":  # packs at both lengths, cached beside each other
        assert {seq for _, seq in src.streams["a"]._packs} == {32, 64}


@pytest.mark.parametrize("stop", [3, 4])  # at the boundary, inside the long stage
def test_resume_across_a_length_change_gives_the_uninterrupted_batches(prefixes, tmp_path, stop):
    cfg, layout = make_cfg(prefixes, two_stages())
    straight = _batches(source(cfg, layout, tmp_path), 6)
    first = source(cfg, layout, tmp_path)
    _batches(first, stop)
    resumed = source(cfg, layout, tmp_path)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as stored in a checkpoint
    for want, got in zip(straight[stop:], _batches(resumed, 6 - stop), strict=True):
        for a, b in zip(want, got, strict=True):
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _batches(src, n: int) -> list[list[dict]]:
    return [[{k: t.clone() for k, t in b.items()} for b in src.next_batch()] for _ in range(n)]


@pytest.mark.parametrize(
    "long, sections, world, message",
    [
        ({"seq_length": 128}, {}, 1, "data.stages[1].seq_length: expected at most model.max_position_embeddings=64"),
        (
            {"seq_length": 256, "max_position_embeddings": 128},
            {},
            1,
            "data.stages[1].seq_length: expected at most data.stages[1].max_position_embeddings=128",
        ),
        ({"seq_length": 1}, {}, 1, "data.stages[1].seq_length: expected an integer >= 2 or null"),
        ({"rotary_base": -1.0}, {}, 1, "data.stages[1].rotary_base: expected a number > 0 or null"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, {}, 1, "data.stages[1].rope_scaling.factor must be"),
        ({"rope_scaling": {"rope_type": "nope"}}, {}, 1, "data.stages[1].rope_scaling.rope_type='nope' is not"),
        (
            {"seq_length": 62},
            {"parallel": {"context_parallel_size": 2}},
            2,
            "data.stages[1].seq_length: expected a multiple of 2 * parallel.context_parallel_size = 4",
        ),
        (
            {"seq_length": 63},
            {"parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True}},
            2,
            "data.stages[1].seq_length: expected a multiple of tensor_model_parallel_size x context_parallel_size = 2",
        ),
    ],
)
def test_bad_stage_lengths_and_ropes_are_one_line_errors(prefixes, long, sections, world, message):
    stages = two_stages()
    stages[1] = {k: v for k, v in stages[1].items() if k not in ("seq_length", "rotary_base")} | long
    with pytest.raises(ConfigError) as err:
        make_cfg(prefixes, stages, world, **sections)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_weights_only_start_from_weights_of_another_rope_is_said(prefixes, caplog):
    from megatron_ct.training.startup import _warn_if_rope_differs

    cfg, _ = make_cfg(prefixes, two_stages())
    with caplog.at_level(logging.WARNING, logger="megatron_ct.training.startup"):
        _warn_if_rope_differs(cfg, "ck/iter_0000004", {"rotary_base": 10000, "max_position_embeddings": 64})
        assert not caplog.records  # the config's RoPE
        _warn_if_rope_differs(cfg, "ck/iter_0000004", {"rotary_base": 1e6, "max_position_embeddings": 128})
    assert "ck/iter_0000004 was trained with RoPE theta 1e+06" in caplog.text
