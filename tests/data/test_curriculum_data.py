"""The curriculum engine without a model: blend adherence, packing, determinism, resume and edits."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from megatron_ct.config import ConfigError, load_config, validate_for_world
from megatron_ct.config.loader import build_config
from megatron_ct.config.schedule import Schedule, Stage
from megatron_ct.data.batches import build_data_source
from megatron_ct.data.index_cache import IndexCache
from megatron_ct.data.interleave import Segment, StageWindow
from megatron_ct.data.packing import PackingOptions, build_batch
from megatron_ct.data.stream import Window
from megatron_ct.model.attention import document_mask as document_attention_mask
from megatron_ct.training.startup import check_startup

SEQ = 32


def make_cfg(corpora, stages, *, gbs=8, mbs=2, seq=SEQ, iters=None, world=1, **data):
    datasets = {n: corpora[n] for n in ("zh", "en", "code")}
    raw = {
        "train": {"global_batch_size": gbs, "micro_batch_size": mbs, "train_iters": iters or 10},
        "data": {"seq_length": seq, "datasets": datasets, "stages": stages, **data},
        # The corpora use the 32k LLaMA tokenizer; the start-up check refuses smaller models.
        "model": {"max_position_embeddings": max(seq, 64), "vocab_size": 32000},
    }
    cfg = build_config(raw)
    return cfg, validate_for_world(cfg, world)


def source(cfg, layout, tmp_path, dp_rank=0):
    cfg.data.index_cache_dir = str(tmp_path / "cache")
    return build_data_source(cfg, layout, Schedule.from_config(cfg), dp_rank, IndexCache(cfg.data.index_cache_dir))


THREE_STAGES = [
    {"name": "general", "iters": 1000, "blend": {"zh": 0.5, "en": 0.3, "code": 0.2}},
    # Linly-style: the Chinese share rises linearly across the stage.
    {"name": "ramp", "iters": 1500, "blend": {"zh": 0.1, "en": 0.9}, "end_blend": {"zh": 0.9, "en": 0.1}},
    {"name": "replay", "blend": {"zh": 0.6, "en": 0.2, "code": 0.2}, "packing": "by_source"},
]


def test_blend_adherence_in_every_1000_sample_window_with_ramps(corpora, tmp_path):
    cfg, layout = make_cfg(corpora, THREE_STAGES, iters=4000)
    src = source(cfg, layout, tmp_path)
    names = src.schedule.names
    ids, scheduled = [], []
    for _ in range(4000):  # 32,000 samples across three stages
        window, first, refs = src.plan()
        ids += [r.dataset for r in refs]
        scheduled += [window.weights_at(first + i) for i in range(len(refs))]
    onehot = np.eye(len(names))[ids]  # [n, datasets]
    actual = np.vstack([np.zeros(len(names)), np.cumsum(onehot, 0)])
    target = np.vstack([np.zeros(len(names)), np.cumsum(np.array(scheduled), 0)])
    window = 1000
    share_error = ((actual[window:] - actual[:-window]) - (target[window:] - target[:-window])) / window
    worst = np.abs(share_error).max()
    print(f"worst share error over {len(ids) - window + 1} windows: {100 * worst:.3f} pp")
    assert worst <= 0.01
    # The ramp really ramps: zh goes from ~10% to ~90% of stage 2's samples.
    ramp = np.array(ids[8000:20000])
    zh = names.index("zh")
    assert abs((ramp[:1000] == zh).mean() - 0.133) < 0.01 and abs((ramp[-1000:] == zh).mean() - 0.867) < 0.01


def test_interleave_keeps_200_datasets_within_one_sample_of_target():
    rng = np.random.default_rng(0)
    a, b = rng.dirichlet(np.ones(200)), rng.dirichlet(np.ones(200))
    stage = Stage(0, "s", 0, 2500, a, b)
    ids = Segment(StageWindow(stage, 0, 20000), 0).take(20000)
    counts = np.cumsum(np.eye(200)[ids], 0)
    x = np.arange(1, 20001)[:, None]
    target = x * (a + (b - a) * x / (2 * 20000))  # integral of the linear ramp
    assert np.abs(counts - target).max() < 1.0


def test_by_source_sequences_hold_whole_documents_of_one_dataset(corpora, tmp_path):
    seq = 256  # English paragraphs (~50 tokens) pack several to a sequence
    stages = [{"name": "sft", "blend": {"zh": 0.3, "en": 0.5, "code": 0.2}, "packing": "by_source"}]
    cfg, layout = make_cfg(corpora, stages, seq=seq, iters=30)
    src = source(cfg, layout, tmp_path)
    capacity = seq + 1
    allowed = {}  # per dataset: its documents, and the capacity-sized pieces of longer ones
    for name, stream in src.streams.items():
        docs = [tuple(stream.read_document(i).tolist()) for i in range(stream.num_docs)]
        allowed[name] = set(docs) | {c for d in docs if len(d) > capacity for c in _chunks(d, capacity)}
    multi_doc, padded = 0, 0
    for _ in range(30):
        _, _, refs = src.plan()
        windows = [src.streams[src.schedule.names[r.dataset]].read(r.position, r.length) for r in refs]
        for r, w in zip(refs, windows, strict=True):
            name = src.schedule.names[r.dataset]
            bounds = sorted({0, *w.doc_starts.tolist(), len(w.tokens)})
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                assert tuple(w.tokens[lo:hi].tolist()) in allowed[name], (name, lo, hi)
            multi_doc += len(w.doc_starts) > 1
        batch = build_batch(windows, seq, PackingOptions())
        for row, w in enumerate(windows):
            n = len(w.tokens)
            padded += n < capacity
            assert batch["loss_mask"][row, : n - 1].eq(1).all() and batch["loss_mask"][row, n - 1 :].eq(0).all()
    assert multi_doc > 20 and padded > 20, (multi_doc, padded)


def _chunks(doc: tuple, size: int) -> list[tuple]:
    return [doc[i : i + size] for i in range(0, len(doc), size)]


def test_packing_resets_positions_masks_attention_and_eod_loss():
    w = Window(np.arange(10, 19, dtype=np.int64), np.array([0, 3, 7]))  # documents [0,3) [3,7) [7,9)
    opts = PackingOptions(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    b = build_batch([w], 9, opts)  # 9 real tokens of 10: the last position is padding
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    # No loss predicting a next document's first token (positions 2 and 6), nor past the end.
    assert b["loss_mask"][0].tolist() == [1, 1, 0, 1, 1, 1, 0, 1, 0]
    mask = document_attention_mask(b["segment_ids"])[0, 0]  # True = masked
    allowed = [[j for j in range(9) if not mask[i, j]] for i in range(9)]
    assert allowed[4] == [3, 4] and allowed[2] == [0, 1, 2] and allowed[8] == [7, 8]
    plain = build_batch([w], 9, PackingOptions())
    assert "segment_ids" not in plain and plain["position_ids"][0].tolist() == list(range(9))


def _run(src, steps):
    """The batches of ``steps`` (consecutive, starting where the source stands)."""
    out = []
    for k in steps:
        assert src.position.next_step == k
        out.append([{n: t.clone() for n, t in b.items()} for b in src.next_batch()])
    return out


def _same(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b, strict=True):
        for ba, bb in zip(sa, sb, strict=True):
            assert ba.keys() == bb.keys()
            for key in ba:
                assert ba[key].equal(bb[key]), key


SHORT = [
    {"name": "general", "iters": 6, "blend": {"zh": 0.5, "en": 0.5}},
    {
        "name": "ramp",
        "iters": 10,
        "blend": {"zh": 0.2, "en": 0.6, "code": 0.2},
        "end_blend": {"zh": 0.7, "en": 0.1, "code": 0.2},
        "reset_attention_mask": True,
        "reset_position_ids": True,
        "eod_mask_loss": True,
    },
    {"name": "sft", "blend": {"zh": 0.5, "code": 0.5}, "packing": "by_source"},
]


@pytest.mark.parametrize("world, dp_rank", [(1, 0), (2, 1)])
def test_resume_from_saved_state_gives_the_uninterrupted_batches(corpora, tmp_path, world, dp_rank):
    cfg, layout = make_cfg(corpora, SHORT, iters=24, world=world)
    straight = _run(source(cfg, layout, tmp_path, dp_rank), range(24))
    again = _run(source(cfg, layout, tmp_path, dp_rank), range(24))
    _same(straight, again)  # a pure function of (seed, schedule, step)

    first = source(cfg, layout, tmp_path, dp_rank)
    _same(_run(first, range(9)), straight[:9])  # stop mid-stage 2
    state = json.loads(json.dumps(first.state_dict()))  # as stored in the checkpoint's common dict
    resumed = source(cfg, layout, tmp_path, dp_rank)
    resumed.load_state_dict(state)
    _same(_run(resumed, range(9, 24)), straight[9:])


def _positions(src, steps):
    """Per dataset, the (stream position, advance) of its samples in ``steps``; per stage, the
    datasets' sample counts."""
    seen: dict[str, list[tuple[int, int]]] = {}
    per_stage: dict[str, dict[str, int]] = {}
    for _ in steps:
        window, _, refs = src.plan()
        stage = window.stage
        for r in refs:
            name = src.schedule.names[r.dataset]
            advance = SEQ if stage.packing == "concat" else r.length
            seen.setdefault(name, []).append((r.position, advance))
            counts = per_stage.setdefault(stage.name, {})
            counts[name] = counts.get(name, 0) + 1
    return seen, per_stage


def test_schedule_edit_on_resume_continues_each_dataset_where_it_stopped(corpora, tmp_path):
    cfg, layout = make_cfg(corpora, SHORT, iters=24)
    first = source(cfg, layout, tmp_path)
    before, _ = _positions(first, range(9))  # stops 3 steps into stage 'ramp'
    state = json.loads(json.dumps(first.state_dict()))

    edited = json.loads(json.dumps(SHORT))
    edited[1]["blend"] = edited[1]["end_blend"] = {"zh": 0.1, "en": 0.1, "code": 0.8}  # the current stage
    edited[2] = {"name": "sft2", "blend": {"en": 0.5, "zh": 0.5}, "packing": "by_source"}  # a future stage
    cfg2, layout2 = make_cfg(corpora, edited, iters=24)
    resumed = source(cfg2, layout2, tmp_path)
    resumed.load_state_dict(state)
    after, per_stage = _positions(resumed, range(9, 24))

    for name in set(before) | set(after):
        expected = 0
        for position, advance in before.get(name, []) + after.get(name, []):
            assert position == expected, f"{name}: sample at {position}, expected {expected} (repeat or skip)"
            expected += advance
    # The edits took effect: 80% code in the rest of 'ramp' (7 steps), no code in 'sft2'.
    assert abs(per_stage["ramp"]["code"] - 0.8 * 56) <= 1
    assert "code" not in per_stage["sft2"] and sum(per_stage["sft2"].values()) == 64


def test_megatron_data_path_and_split(corpora, tmp_path):
    cfg = load_config(
        None,
        [
            "--data-path",
            "0.25",
            corpora["zh"],
            "0.75",
            corpora["en"],
            "--split",
            "90,10,0",
            "model.vocab_size=32000",
            "data.seq_length=32",
            "train.train_iters=4",
        ],
    )
    d = cfg.data
    assert d.source == "indexed" and [s.name for s in d.stages] == ["main"]
    assert d.stages[0].blend == {"zh_text_document": 0.25, "en_text_document": 0.75}
    assert d.valid["valid"].doc_range == pytest.approx([0.9, 1.0])
    src = source(cfg, validate_for_world(cfg, 1), tmp_path)
    train_docs = src.streams["en_text_document"].num_docs
    assert train_docs == 360  # 90% of 400 documents; the last 10% are the validation set
    for _ in range(4):
        src.plan()


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"name": "a", "iters": 2, "blend": {"xx": 1}}], "data.stages[0].blend.xx: expected a dataset named in"),
        ([{"name": "a", "iters": 2, "blend": {"zh": 1}, "pack": "concat"}], "data.stages[0].pack: expected one of"),
        ([{"name": "a", "iters": 2, "tokens": 9, "blend": {"zh": 1}}], "data.stages[0].tokens: expected null"),
        ([{"name": "a", "blend": {"zh": 1}}, {"name": "b", "blend": {"zh": 1}}], "data.stages[0].iters: expected a"),
        ([{"name": "a", "iters": 2, "blend": {"zh": -1}}], "data.stages[0].blend: expected a mapping"),
        ([{"name": "a", "iters": 2, "blend": {"zh": 1}, "packing": "pad"}], "data.stages[0].packing: expected one"),
        ([{"name": "a", "iters": 2, "blend": {"zh": 1}}], "train.train_iters: expected at most the curriculum's 2"),
    ],
)
def test_config_errors_name_the_key(corpora, stages, message):
    with pytest.raises(ConfigError) as err:
        make_cfg(corpora, stages, iters=10)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_dataset_file_is_one_line_naming_the_key(corpora, tmp_path):
    cfg, layout = make_cfg(corpora, [{"name": "a", "blend": {"zh": 1}}])
    cfg.data.datasets["zh"].prefixes = [str(tmp_path / "nope_text_document")]
    with pytest.raises(ConfigError, match=r"^data\.datasets\.zh\.prefixes\[0\]: expected .*nope_text_document\.bin"):
        source(cfg, layout, tmp_path)


def test_index_cache_makes_200_dataset_blends_start_fast(tmp_path):
    """200 datasets: the first start builds and caches every index, the next loads them."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    datasets = {}
    for i in range(200):
        prefix = str(tmp_path / "data" / f"d{i:03d}")
        (tmp_path / "data").mkdir(exist_ok=True)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for _ in range(rng.integers(20, 60)):
            doc = rng.integers(0, 1000, rng.integers(5, 200)).astype(np.uint16)
            builder.add_document(doc, [len(doc)])
        builder.finalize(prefix + ".idx")
        datasets[f"d{i:03d}"] = prefix
    weights = dict(zip(datasets, rng.dirichlet(np.ones(200)).tolist(), strict=True))
    raw = {
        "train": {"global_batch_size": 8, "micro_batch_size": 8, "train_iters": 4},
        "model": {"vocab_size": 1000},  # the synthetic documents' ids are < 1000
        "data": {
            "seq_length": 32,
            "datasets": datasets,
            "stages": [{"name": "s", "blend": weights, "packing": "by_source"}],
            "index_cache_dir": str(tmp_path / "cache"),
        },
    }
    cfg = build_config(raw)
    layout = validate_for_world(cfg, 1)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        startup = check_startup(cfg, layout)  # the largest-id scan of every dataset
        src = build_data_source(cfg, layout, startup.schedule, 0, startup.cache)
        times.append(time.perf_counter() - t0)
        caches = src.cache
    print(f"200 datasets: cold start {times[0]:.2f}s, warm start {times[1]:.2f}s")
    # order, cumulative lengths, packs and the largest token id of each dataset
    assert caches.built == 0 and caches.loaded == 800
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 800
    assert times[1] < 30


def test_index_cache_falls_back_to_memory_when_unwritable(tmp_path, caplog):
    cache = IndexCache(str(tmp_path / "file_not_dir" / "x"))
    (tmp_path / "file_not_dir").write_text("")
    arr = cache.get("p", "ds", "k", "order", lambda: np.arange(3))
    assert arr.tolist() == [0, 1, 2] and cache.built == 1
    assert "not writable" in caplog.text


def test_data_parallel_ranks_partition_each_global_batch(corpora, tmp_path):
    cfg1, layout1 = make_cfg(corpora, SHORT, iters=24, world=1)
    cfg2, layout2 = make_cfg(corpora, SHORT, iters=24, world=2)
    one = _run(source(cfg1, layout1, tmp_path), range(24))
    ranks = [_run(source(cfg2, layout2, tmp_path, r), range(24)) for r in (0, 1)]
    for step in (0, 10, 23):  # one step per stage
        whole = torch.cat([b["tokens"] for b in one[step]])  # sample order: micro-batch, then row
        parts = torch.cat([torch.cat([ranks[r][step][j]["tokens"] for r in (0, 1)]) for j in range(2)])
        assert whole.equal(parts)
