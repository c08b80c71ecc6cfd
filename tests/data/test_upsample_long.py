"""Length-aware mixing (data.datasets.X.upsample_long): long documents K times per epoch, the
stream still a complete, deterministic token stream, and the histogram says what changed."""

from collections import Counter

import numpy as np
import pytest
from test_indexed import write_ours

from megatron_ct.config import ConfigError
from megatron_ct.config.schema import DatasetConfig
from megatron_ct.data.curriculum import describe_lengths
from megatron_ct.data.index_cache import IndexCache
from megatron_ct.data.stream import DocumentStream


def corpus(tmp_path) -> tuple[str, list[np.ndarray]]:
    # 20 documents: 16 short (5..20 tokens), 4 long (60..90), each document's tokens all its own id
    lengths = [5 + i for i in range(16)] + [60, 70, 80, 90]
    docs = [np.full(n, i, dtype=np.int64) for i, n in enumerate(lengths)]
    prefix = str(tmp_path / "d_text_document")
    write_ours(prefix, docs)
    return prefix, docs


def stream(prefix, up=None, shuffle=True, seed=0):
    cfg = DatasetConfig(prefixes=[prefix], upsample_long=up)
    return DocumentStream("d", cfg, key="data.datasets.d", seed=seed, cache=IndexCache(enabled=False),
                          shuffle=shuffle)  # fmt: skip


def test_long_documents_come_k_times_per_epoch_and_whole(tmp_path):
    prefix, docs = corpus(tmp_path)
    plain, up = stream(prefix), stream(prefix, {"min_tokens": 60, "factor": 3})
    total = sum(len(d) for d in docs)
    long_tokens = sum(len(d) for d in docs if len(d) >= 60)
    assert plain.tokens_per_epoch == total and up.tokens_per_epoch == total + 2 * long_tokens
    assert up.docs_per_epoch == 20 + 2 * 4
    epoch = up.read(0, up.tokens_per_epoch).tokens  # one whole epoch
    counts = Counter(epoch.tolist())  # tokens per document id
    for i, d in enumerate(docs):
        assert counts[i] == len(d) * (3 if len(d) >= 60 else 1), i
    # Documents are never cut apart by the repetition: every segment is one whole document.
    window = up.read(0, up.tokens_per_epoch)
    bounds = [*window.doc_starts.tolist(), up.tokens_per_epoch]
    assert len(bounds) - 1 == up.docs_per_epoch
    segments = [epoch[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert all(len(set(seg.tolist())) == 1 and len(seg) == len(docs[seg[0]]) for seg in segments)
    copies = Counter(int(seg[0]) for seg in segments)
    assert copies == {i: 3 if len(d) >= 60 else 1 for i, d in enumerate(docs)}
    # Deterministic per seed and epoch, and the next epoch goes on seamlessly.
    again = stream(prefix, {"min_tokens": 60, "factor": 3})
    assert np.array_equal(again.read(0, up.tokens_per_epoch).tokens, epoch)
    assert np.array_equal(up.read(up.tokens_per_epoch - 10, 30).tokens[10:], again.read(up.tokens_per_epoch, 20).tokens)
    # The histogram: long documents' share of the epoch's tokens grows.
    hist = up.length_histogram([16, 60])
    assert hist["natural"][2] == pytest.approx(long_tokens / total)
    assert hist["epoch"][2] == pytest.approx(3 * long_tokens / up.tokens_per_epoch)
    line = describe_lengths("d", up, 16)
    assert "documents >= 60 tokens x3" in line and ">=60" in line


def test_bad_settings_are_one_line_errors(tmp_path):
    prefix, _ = corpus(tmp_path)
    for bad, key in (({"min_tokens": 60}, "upsample_long"), ({"min_tokens": 60, "factor": 1.5}, "factor"),
                     ({"min_tokens": 0, "factor": 2}, "min_tokens")):  # fmt: skip
        with pytest.raises(ConfigError, match=r"^data.datasets.d.upsample_long"):
            DatasetConfig.parse({"prefix": prefix, "upsample_long": bad}, "data.datasets.d")
        assert key
    with pytest.raises(ConfigError, match="expected none for a validation set"):
        stream(prefix, {"min_tokens": 60, "factor": 2}, shuffle=False)


def test_curriculum_with_upsampling_resumes_exactly_and_logs_the_histogram(corpora, tmp_path, caplog):
    """Real corpora in the three-stage curriculum (concat and by_source packing): batches after a
    resume are the uninterrupted ones, and the start-up log shows the length shares."""
    import json
    import logging

    from test_curriculum_data import SHORT, _run, _same, make_cfg, source

    cfg, layout = make_cfg(corpora, SHORT, iters=16)
    for name in ("zh", "code"):
        cfg.data.datasets[name] = DatasetConfig(
            prefixes=cfg.data.datasets[name].prefixes, upsample_long={"min_tokens": 200, "factor": 4}
        )
    with caplog.at_level(logging.INFO, logger="megatron_ct"):
        first = source(cfg, layout, tmp_path)
    assert "dataset 'zh' token share by document length (documents >= 200 tokens x4)" in caplog.text
    for name in ("zh", "code"):  # some documents are long enough to be repeated, not all
        stream = first.streams[name]
        assert stream.num_docs < stream.docs_per_epoch < 4 * stream.num_docs
    straight = _run(first, range(16))
    part = source(cfg, layout, tmp_path)
    _same(_run(part, range(7)), straight[:7])
    state = json.loads(json.dumps(part.state_dict()))
    resumed = source(cfg, layout, tmp_path)
    resumed.load_state_dict(state)
    _same(_run(resumed, range(7, 16)), straight[7:])


def test_trainer_start_up_accepts_an_upsampled_training_set(corpora, tmp_path):
    """The start-up scan of every dataset (ids vs vocabulary) reads each file once in order: an
    up-sampled training set passes it (it used to be refused as if it were a validation set);
    an up-sampled validation set is still one line naming its key."""
    from test_curriculum_data import SHORT, make_cfg

    from megatron_ct.training.startup import check_startup

    cfg, layout = make_cfg(corpora, SHORT, iters=4)
    cfg.data.index_cache_dir = str(tmp_path / "cache")
    up = {"min_tokens": 200, "factor": 4}
    cfg.data.datasets["zh"] = DatasetConfig(prefixes=cfg.data.datasets["zh"].prefixes, upsample_long=up)
    assert "zh" in check_startup(cfg, layout).schedule.names
    cfg.data.valid = {"zh_valid": DatasetConfig(prefixes=cfg.data.datasets["zh"].prefixes, upsample_long=up)}
    with pytest.raises(ConfigError, match=r"^data.valid.zh_valid.upsample_long: expected none for a validation set"):
        check_startup(cfg, layout)
