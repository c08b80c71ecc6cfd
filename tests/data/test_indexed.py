"""megatron_ct.data.indexed: the .bin/.idx format read, written and checked without megatron-core.

- our writer's bytes equal megatron-core's ``IndexedDatasetBuilder``'s; our reader returns what
  megatron-core's ``IndexedDataset`` returns (also for upstream's several-sequences documents);
- every integrity fault is a one-line DataError naming the file, at open, before training;
- the fingerprint follows content: a corpus re-tokenized into the same prefix (same sizes, same
  mtime) never reuses the index cache, and a resume names the dataset whose files changed;
- the metadata sidecar replaces the start-up scan of the .bin, a stale one is ignored;
- datasets tokenized with different tokenizers are refused at start-up in one line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from megatron_ct.config.loader import build_config
from megatron_ct.config.schema import DatasetConfig
from megatron_ct.config.validate import validate_for_world
from megatron_ct.data.batches import build_data_source
from megatron_ct.data.index_cache import IndexCache
from megatron_ct.data.indexed import (
    DatasetMeta,
    check_same_tokenizer,
    meta_path,
    open_indexed,
    read_meta,
)
from megatron_ct.data.stream import DocumentStream
from megatron_ct.errors import DataError
from megatron_ct.preprocess.writer import IndexedDatasetWriter
from megatron_ct.training.startup import check_startup

FP = {"file": "tok.model", "sha256": "a" * 64, "vocab_size": 1000, "eod_id": 2, "unk_id": 0}


def random_docs(seed: int, n: int, vocab: int = 1000, max_len: int = 200) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, max_len)) for _ in range(n)]


def write_ours(prefix: str, docs: list[np.ndarray], dtype=np.uint16, tokenizer: dict | None = FP) -> DatasetMeta:
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with IndexedDatasetWriter({"t": prefix}, dtype, tokenizer) as w:
        for lo in range(0, len(docs), 7):  # several chunks, as the pipeline writes them
            part = docs[lo : lo + 7]
            w.add_documents("t", np.concatenate(part).astype(dtype), np.array([len(d) for d in part]), unknown=0)
        return w.commit()["t"]


def write_megatron(prefix: str, docs: list[np.ndarray], dtype=np.uint16, sequences_per_doc: int = 1) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        if sequences_per_doc == 1 or len(doc) < sequences_per_doc:
            builder.add_document(doc, [len(doc)])
        else:  # upstream --split-sentences: one document, several sequences
            cut = len(doc) // 2
            builder.add_document(doc, [cut, len(doc) - cut])
    builder.finalize(prefix + ".idx")


def read_bytes(prefix: str) -> tuple[bytes, bytes]:
    return tuple(open(prefix + ext, "rb").read() for ext in (".bin", ".idx"))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_is_byte_identical_to_megatron_core_builder(tmp_path, dtype):
    docs = random_docs(0, 50, vocab=70000 if dtype == np.int32 else 1000)
    write_ours(str(tmp_path / "ours" / "d"), docs, dtype)
    write_megatron(str(tmp_path / "mcore" / "d"), docs, dtype)
    assert read_bytes(str(tmp_path / "ours" / "d")) == read_bytes(str(tmp_path / "mcore" / "d"))


@pytest.mark.parametrize("sequences_per_doc", [1, 2])
def test_reader_returns_what_megatron_core_reads(tmp_path, sequences_per_doc):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(tmp_path / "d")
    write_megatron(prefix, random_docs(1, 40), sequences_per_doc=sequences_per_doc)
    ours, ref = open_indexed(prefix), IndexedDataset(prefix)
    assert len(ours) == len(ref) and ours.dtype == ref.index.dtype
    assert np.array_equal(ours.sequence_lengths, ref.sequence_lengths)
    assert np.array_equal(ours.document_indices, ref.document_indices)
    for i in range(len(ref)):
        assert np.array_equal(ours.get(i), ref[i])
        assert np.array_equal(ours.get(i, offset=1, length=3), ref.get(i, offset=1, length=3))
    assert ours.meta is None  # written by megatron-core: no sidecar


def test_sidecar_describes_the_dataset(tmp_path):
    docs = random_docs(2, 30)
    prefix = str(tmp_path / "d")
    meta = write_ours(prefix, docs)
    assert read_meta(prefix) == meta
    assert (meta.documents, meta.sequences) == (30, 30)
    assert meta.tokens == sum(len(d) for d in docs) and meta.max_token_id == max(int(d.max()) for d in docs)
    assert meta.tokenizer == FP and meta.dtype == "uint16" and meta.bin_bytes == 2 * meta.tokens
    assert open_indexed(prefix).meta == meta


# --- integrity faults --------------------------------------------------------------------------------
def _fault(prefix: str, other: str, case: str) -> str:
    """Damage ``prefix`` as ``case`` says; return the file the error must name."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    if case == "bin-short-by-4kb":
        with open(bin_, "r+b") as f:
            f.truncate(os.path.getsize(bin_) - 4096)
        return bin_
    if case == "idx-of-another-dataset":
        shutil.copyfile(other + ".idx", idx)
        return bin_
    if case == "empty-idx":
        open(idx, "wb").close()
        return idx
    if case == "empty-bin":
        open(bin_, "wb").close()
        return bin_
    if case == "truncated-idx":
        with open(idx, "r+b") as f:
            f.truncate(os.path.getsize(idx) - 100)
        return idx
    data = bytearray(open(idx, "rb").read())
    if case == "wrong-magic":
        data[:9] = b"NOTANIDX\x00"
    elif case == "wrong-version":
        data[9:17] = (7).to_bytes(8, "little")
    elif case == "bad-dtype-code":
        data[17] = 42
    elif case == "corrupt-pointer":
        n = int.from_bytes(data[18:26], "little")
        at = 34 + 4 * n + 8 * 5  # the sixth sequence pointer
        data[at : at + 8] = (12345).to_bytes(8, "little")
    elif case == "descending-document-index":
        n = int.from_bytes(data[18:26], "little")
        at = 34 + 12 * n + 8 * 5  # the sixth document index
        data[at : at + 8] = (1).to_bytes(8, "little")
    open(idx, "wb").write(bytes(data))
    return idx


FAULTS = {
    "bin-short-by-4kb": "truncated, or the .idx belongs to another dataset",
    "idx-of-another-dataset": "truncated, or the .idx belongs to another dataset",
    "empty-idx": "empty, expected an IndexedDataset index",
    "empty-bin": "0 bytes, expected",
    "truncated-idx": "(truncated or corrupt)",
    "wrong-magic": "(a megatron-core IndexedDataset)",
    "wrong-version": "index version 7, expected 1",
    "bad-dtype-code": "token dtype code 42",
    "corrupt-pointer": "sequence pointers disagree with the lengths",
    "descending-document-index": "document indices are not ascending from 0 to 4000",
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_each_integrity_fault_is_one_line_naming_the_file(tmp_path, case):
    prefix, other = str(tmp_path / "d"), str(tmp_path / "small")
    write_ours(prefix, random_docs(3, 4000))  # ~400k tokens: 4 KB is a small part of the .bin
    write_ours(other, random_docs(4, 10))
    named = _fault(prefix, other, case)
    with pytest.raises(DataError) as err:
        open_indexed(prefix)
    message = str(err.value)
    assert message.startswith(named + ":") and FAULTS[case] in message and "\n" not in message


def test_a_dataset_without_documents_is_refused(tmp_path):
    prefix = str(tmp_path / "empty")
    with IndexedDatasetWriter({"t": prefix}, np.uint16) as w:
        w.commit()
    with pytest.raises(DataError, match=r"empty\.idx: holds no document, expected at least one"):
        open_indexed(prefix)


def test_missing_bin_is_named(tmp_path):
    prefix = str(tmp_path / "d")
    write_ours(prefix, random_docs(5, 3))
    os.remove(prefix + ".bin")
    with pytest.raises(DataError, match=r"d\.bin: missing"):
        open_indexed(prefix)


# --- at start-up -----------------------------------------------------------------------------------
def curriculum_cfg(datasets: dict[str, str], cache_dir: str, vocab: int = 1000):
    raw = {
        "train": {"global_batch_size": 4, "micro_batch_size": 4, "train_iters": 4},
        "model": {"vocab_size": vocab},
        "data": {
            "seq_length": 16,
            "datasets": datasets,
            "stages": [{"name": "s", "blend": dict.fromkeys(datasets, 1.0)}],
            "index_cache_dir": cache_dir,
        },
    }
    cfg = build_config(raw)
    return cfg, validate_for_world(cfg, 1)


def start(cfg, layout):
    """What the trainer does at start-up: the checks of every dataset, then the data source."""
    startup = check_startup(cfg, layout)
    return build_data_source(cfg, layout, startup.schedule, 0, startup.cache)


def test_truncated_bin_stops_the_run_at_start_up(tmp_path):
    write_ours(str(tmp_path / "a"), random_docs(6, 20))
    write_ours(str(tmp_path / "b"), random_docs(7, 20))
    with open(str(tmp_path / "b.bin"), "r+b") as f:
        f.truncate(10)
    cfg, layout = curriculum_cfg({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        start(cfg, layout)
    assert str(err.value).startswith(str(tmp_path / "b.bin") + ": 10 bytes, expected")


def test_retokenized_corpus_same_sizes_same_mtime_rebuilds_the_index(tmp_path, caplog):
    """The weak key (path, size) would reuse the old offsets here; the fingerprint does not."""
    prefix = str(tmp_path / "zh")
    old = random_docs(8, 50)
    write_ours(prefix, old)
    cfg, layout = curriculum_cfg({"zh": prefix}, str(tmp_path / "cache"))
    first = start(cfg, layout)
    first.plan()
    state = first.state_dict()
    stat = {ext: os.stat(prefix + ext) for ext in (".bin", ".idx")}

    # Same documents' lengths in another order: every file keeps its size.
    new = [old[i] for i in np.random.default_rng(0).permutation(len(old))]
    write_ours(prefix, new)
    for ext, st in stat.items():
        os.utime(prefix + ext, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.path.getsize(prefix + ext) == st.st_size
    second = start(cfg, layout)
    assert second.cache.built > 0  # nothing reused from the first corpus' cache
    _, cum = second.streams["zh"].epoch_index(0)
    order, _ = second.streams["zh"].epoch_index(0)
    lengths = np.array([len(d) for d in new])
    assert np.array_equal(cum, np.concatenate([[0], np.cumsum(lengths[order])]))
    with caplog.at_level(logging.WARNING, logger="megatron_ct"):
        second.load_state_dict(state)
    assert f"dataset 'zh': files differ from the checkpoint's ({prefix})" in caplog.text


def test_sidecar_replaces_the_scan_and_a_stale_one_is_ignored(tmp_path, caplog):
    prefix = str(tmp_path / "d")
    docs = random_docs(9, 20)
    write_ours(prefix, docs)
    true_max = max(int(d.max()) for d in docs)
    # Plant a value the .bin does not hold: only a reader of the sidecar can return it.
    meta = json.load(open(meta_path(prefix)))
    meta["max_token_id"] = 4242
    json.dump(meta, open(meta_path(prefix), "w"))
    cache = IndexCache(str(tmp_path / "cache"))

    def stream():
        return DocumentStream("d", DatasetConfig(prefixes=[prefix]), key="k", seed=0, cache=cache)

    assert stream().max_token_id() == (4242, prefix) and cache.built == 0
    # The .idx changes (re-tokenized by another tool that left our sidecar behind): the sidecar
    # describes other files and is ignored; the .bin is scanned.
    write_megatron(prefix, docs[:-1])
    with caplog.at_level(logging.WARNING, logger="megatron_ct"):
        top = stream().max_token_id()
    assert top == (max(int(d.max()) for d in docs[:-1]), prefix) and cache.built == 1
    assert "describes other files" in caplog.text and true_max >= top[0]


def test_datasets_of_different_tokenizers_are_refused_at_start_up(tmp_path):
    write_ours(str(tmp_path / "a"), random_docs(10, 10))
    write_ours(str(tmp_path / "b"), random_docs(11, 10), tokenizer={**FP, "sha256": "b" * 64, "eod_id": 0})
    write_megatron(str(tmp_path / "c"), random_docs(12, 10))  # upstream: no sidecar, not compared
    paths = {n: str(tmp_path / n) for n in "abc"}
    cfg, layout = curriculum_cfg(paths, str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        start(cfg, layout)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"data.datasets.b ({paths['b']}): tokenized with tok.model")
    assert f"but data.datasets.a ({paths['a']}) with" in message and "EOD 0" in message and "EOD 2" in message
    # Same tokenizer (and a dataset without a sidecar): accepted.
    cfg, layout = curriculum_cfg({"a": paths["a"], "c": paths["c"]}, str(tmp_path / "cache"))
    start(cfg, layout)


def test_same_tokenizer_by_behaviour_is_accepted():
    """The same tokenizer saved twice (e.g. tokenizer.json re-serialized by another transformers
    version) has another file hash but the same ids for the probe text: accepted."""
    base = {"vocab_size": 32000, "eod_id": 2, "probe": "p1"}
    a = DatasetMeta(1, 1, 1, 0, 0, {**base, "file": "tokenizer.model", "sha256": "1"}, "uint16", "x", 2)
    b = DatasetMeta(1, 1, 1, 0, 0, {**base, "file": "tokenizer.json", "sha256": "2"}, "uint16", "y", 2)
    check_same_tokenizer({"a": a, "b": b})
    c = DatasetMeta(1, 1, 1, 0, 0, {**base, "probe": "p2", "file": "tokenizer.json", "sha256": "2"}, "uint16", "y", 2)
    with pytest.raises(DataError, match="^c: tokenized with"):
        check_same_tokenizer({"a": a, "c": c})


def test_a_glob_of_prefixes_reads_every_shard_in_order(tmp_path):
    docs = random_docs(13, 30)
    for k in range(3):
        write_ours(str(tmp_path / f"web-{k:05d}-of-00003_text_document"), docs[10 * k : 10 * k + 10])
    cache = IndexCache(enabled=False)
    cfg = DatasetConfig(prefixes=["web-*-of-00003_text_document"])
    stream = DocumentStream("web", cfg, key="k", seed=0, cache=cache, data_root=str(tmp_path))
    assert len(stream.prefixes) == 3 and stream.prefixes == sorted(stream.prefixes)
    assert [stream.read_document(i).tolist() for i in range(30)] == [d.tolist() for d in docs]
    with pytest.raises(Exception, match=r"k\.prefixes\[0\]: expected the glob .*nothing-\* to match"):
        DocumentStream("x", DatasetConfig(prefixes=["nothing-*"]), key="k", seed=0, cache=cache,
                       data_root=str(tmp_path))  # fmt: skip


@pytest.mark.slow
def test_trainer_refuses_a_corrupt_dataset_in_one_line(tmp_path):
    """pretrain_ct.py: a .bin shorter than its .idx says is one line and exit 2 (torchrun then exits 1),
    no traceback from our code."""
    from launch import run_trainer

    prefix = str(tmp_path / "zh_text_document")
    write_ours(prefix, random_docs(14, 50, vocab=500))
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 4096)
    overrides = [
        "data.datasets={zh: zh_text_document}",
        "data.stages=[{name: a, blend: {zh: 1}}]",
        f"data.data_root={tmp_path}",
        "train.train_iters=2",
        f"data.index_cache_dir={tmp_path}/cache",
    ]
    proc = run_trainer(1, overrides, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain_ct.py: error:")]
    assert len(errors) == 1 and f"{prefix}.bin: " in errors[0] and "truncated, or the .idx belongs" in errors[0]
    assert "megatron_ct/" not in proc.stderr  # no traceback from our code
