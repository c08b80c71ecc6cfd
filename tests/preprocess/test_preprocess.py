"""preprocess(): text -> megatron-core IndexedDataset -> the same text back.

Every output is read with megatron-core's own ``IndexedDataset``, i.e. the
reader upstream Megatron-LM trains from.
"""

from __future__ import annotations

import gzip
import json
import logging
import os

import numpy as np
import pytest

pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")

from material import build_hf_llama_tokenizer, llama_sp_model_path  # noqa: E402

from megatron_ct.preprocess import writer as indexed_writer  # noqa: E402
from megatron_ct.preprocess.pipeline import (  # noqa: E402
    PreprocessConfig,
    PreprocessError,
    output_prefixes,
    preprocess,
)
from megatron_ct.tokenizer import load_tokenizer  # noqa: E402

DOCS = [
    "Hello world. This is the first document.",
    "中文文档：今天天气很好，我们去公园散步。",
    "Multi-line\ndocument with\ttabs and  double  spaces.",
    "Mixed 中英 text with emoji 🦙 and numbers 12345.",
    "Last one.",
]


def IndexedDataset(prefix: str):  # noqa: N802 - stands in for the class
    from megatron.core.datasets.indexed_dataset import IndexedDataset as _IndexedDataset

    return _IndexedDataset(prefix)


def read_ids(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(path)


def config(tmp_path, inputs, tokenizer, **kwargs) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=inputs,
        output_prefix=str(tmp_path / "out" / "corpus"),
        tokenizer=tokenizer,
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def sp_path() -> str:
    return llama_sp_model_path()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return build_hf_llama_tokenizer(tmp_path_factory.mktemp("hf_tokenizer"))


@pytest.mark.parametrize("backend", ["sentencepiece", "hf"])
def test_jsonl_round_trip(tmp_path, backend, sp_path, hf_dir):
    tok_path = sp_path if backend == "sentencepiece" else hf_dir
    tok = load_tokenizer(tok_path)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    cfg = config(tmp_path, [src], tok_path)
    summary = preprocess(cfg)

    prefix = output_prefixes(cfg)["text"]
    assert prefix.endswith("corpus_text_document")
    docs = read_ids(prefix)
    assert len(docs) == len(DOCS)
    for ids, text in zip(docs, DOCS, strict=True):
        assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
        assert ids[:-1] == tok.encode(text)
        assert tok.decode(ids[:-1]) == text
    assert IndexedDataset(prefix).index.dtype == np.uint16  # 32000 ids fit

    assert summary["docs"] == len(DOCS) and summary["lines"] == len(DOCS)
    assert summary["tokens"] == sum(len(ids) for ids in docs)
    assert summary["characters"] == sum(len(d) for d in DOCS)
    assert summary["bytes"] == os.path.getsize(src)
    text_tokens = summary["tokens"] - len(DOCS)  # EOD ids do not count towards tokens per character
    assert summary["tokens_per_character"] == pytest.approx(text_tokens / summary["characters"])
    assert summary["skipped"] == {} and summary["dtype"] == "uint16"
    with open(cfg.output_prefix + "_summary.json", encoding="utf-8") as f:
        assert json.load(f) == summary


def test_text_gzip_and_glob_inputs_in_order(tmp_path, sp_path):
    tok = load_tokenizer(sp_path)
    (tmp_path / "a.txt").write_bytes("first line\r\n\nsecond 行\n".encode())  # CRLF, a blank line
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "from gzip"}) + "\n" + json.dumps({"text": "gzip two"}) + "\n")
    write_jsonl(tmp_path / "c1.jsonl", [{"text": "glob one"}])
    write_jsonl(tmp_path / "c2.jsonl", [{"text": "glob two"}])

    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c*.jsonl")]
    summary = preprocess(config(tmp_path, inputs, sp_path))

    texts = [tok.decode(ids) for ids in read_ids(str(tmp_path / "out" / "corpus_text_document"))]
    assert texts == ["first line", "second 行", "from gzip", "gzip two", "glob one", "glob two"]
    assert summary["skipped"] == {"empty": 1}
    assert len(summary["inputs"]) == 4


def test_bad_lines_are_reported_with_location_and_skipped(tmp_path, sp_path, caplog):
    tok = load_tokenizer(sp_path)
    src = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "no closing brace"',  # line 2: invalid JSON
        json.dumps({"text": "good two"}).encode(),
        b'{"text": "bad \xff\xfe bytes"}',  # line 4: invalid UTF-8
        json.dumps({"body": "wrong key"}).encode(),  # line 5
        json.dumps({"text": 42}).encode(),  # line 6
        json.dumps({"text": "   "}).encode(),  # line 7: empty document
        json.dumps({"text": "good three"}).encode(),
        b'{"text": "lone \\ud800 surrogate"}',  # line 9: valid JSON, not encodable text
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="megatron_ct"):
        summary = preprocess(config(tmp_path, [str(src)], sp_path))

    texts = [tok.decode(ids) for ids in read_ids(str(tmp_path / "out" / "corpus_text_document"))]
    assert texts == ["good one", "good two", "good three"]
    assert summary["skipped"] == {"invalid_json": 1, "invalid_utf8": 2, "missing_key": 1, "not_string": 1, "empty": 1}
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for line_no, reason in [(2, "invalid_json"), (4, "invalid_utf8"), (5, "missing_key"), (6, "not_string")]:
        assert any(m.startswith(f"{src}:{line_no}: skipped line ({reason}") for m in messages), messages
    assert summary["skipped_examples"] == messages[:5]


def test_only_the_first_five_bad_lines_are_logged(tmp_path, sp_path, caplog):
    src = write_jsonl(tmp_path / "bad.jsonl", ["not json"] * 8 + [json.dumps({"text": "ok"})])
    with caplog.at_level(logging.WARNING, logger="megatron_ct"):
        summary = preprocess(config(tmp_path, [src], sp_path, chunk_lines=3))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m.split(": ")[0] for m in messages[:5]] == [f"{src}:{n}" for n in range(1, 6)]
    assert len(messages) == 6 and "only counted" in messages[5]
    assert summary["skipped"] == {"invalid_json": 8} and summary["docs"] == 1


def test_instruction_mode_writes_instruction_newline_response(tmp_path, sp_path):
    tok = load_tokenizer(sp_path)
    pairs = [("把这句话翻译成英文：你好", "Hello"), ("What is 2+2?", "4")]
    src = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": q, "output": a, "id": 1} for q, a in pairs])
    cfg = config(tmp_path, [src], sp_path, instruction_keys=("instruction", "output"))
    preprocess(cfg)
    prefix = str(tmp_path / "out" / "corpus_instruction_document")
    assert output_prefixes(cfg) == {"instruction": prefix}
    docs = read_ids(prefix)
    assert [tok.decode(ids) for ids in docs] == [f"{q}\n{a}" for q, a in pairs]
    assert all(ids[-1] == tok.eod_id for ids in docs)
    assert not os.path.exists(str(tmp_path / "out" / "corpus_text_document.idx"))


def test_several_json_keys_stay_aligned(tmp_path, sp_path):
    tok = load_tokenizer(sp_path)
    records = [{"title": "T1", "text": "body one"}, {"title": "T2"}, {"title": "T3", "text": "body three"}]
    src = write_jsonl(tmp_path / "multi.jsonl", records)
    preprocess(config(tmp_path, [src], sp_path, json_keys=["text", "title"], append_eod=False))
    out = tmp_path / "out"
    bodies = [tok.decode(ids) for ids in read_ids(str(out / "corpus_text_document"))]
    titles = [tok.decode(ids) for ids in read_ids(str(out / "corpus_title_document"))]
    assert (bodies, titles) == (["body one", "body three"], ["T1", "T3"])  # line 2 dropped from both


def test_no_append_eod(tmp_path, sp_path):
    tok = load_tokenizer(sp_path)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    summary = preprocess(config(tmp_path, [src], sp_path, append_eod=False))
    docs = read_ids(str(tmp_path / "out" / "corpus_text_document"))
    assert docs == [tok.encode(d) for d in DOCS]
    assert summary["tokens_per_character"] == pytest.approx(summary["tokens"] / summary["characters"])


def test_worker_count_does_not_change_the_bytes(tmp_path, sp_path):
    records = [{"text": f"{DOCS[i % len(DOCS)]} #{i}"} for i in range(60)]
    records[17] = "{broken"
    write_jsonl(tmp_path / "part1.jsonl", records[:40])
    write_jsonl(tmp_path / "part2.jsonl", records[40:])
    outputs = {}
    for workers in (1, 2):
        cfg = PreprocessConfig(
            inputs=[str(tmp_path / "part*.jsonl")],
            output_prefix=str(tmp_path / f"w{workers}" / "corpus"),
            tokenizer=sp_path,
            workers=workers,
            chunk_lines=7,  # many chunks, so the pool really interleaves them
            progress=False,
        )
        summary = preprocess(cfg)
        prefix = output_prefixes(cfg)["text"]
        outputs[workers] = [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")]
        assert summary["docs"] == 59 and summary["workers"] == workers
    assert outputs[1] == outputs[2]


@pytest.mark.parametrize("workers, error", [(1, RuntimeError), (2, KeyboardInterrupt)])
def test_interrupted_run_leaves_no_final_files(tmp_path, sp_path, monkeypatch, workers, error):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    calls = []
    real_add = indexed_writer.IndexedDatasetWriter.add_documents

    def failing_add(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise error("simulated crash while writing")
        real_add(self, *args)

    monkeypatch.setattr(indexed_writer.IndexedDatasetWriter, "add_documents", failing_add)
    with pytest.raises(error, match="simulated crash"):
        preprocess(config(tmp_path, [src], sp_path, workers=workers, chunk_lines=5))
    assert os.listdir(tmp_path / "out") == []  # no .bin/.idx, no .tmp, no summary


def test_failed_publish_never_pairs_an_old_index_with_new_data(tmp_path, sp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as _IndexedDataset

    first = write_jsonl(tmp_path / "first.jsonl", [{"text": "old data"}])
    second = write_jsonl(tmp_path / "second.jsonl", [{"text": "new data, longer than before"}])
    preprocess(config(tmp_path, [first], sp_path))
    prefix = str(tmp_path / "out" / "corpus_text_document")
    assert _IndexedDataset.exists(prefix)

    real_replace = os.replace

    def replace_failing_on_index(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError("simulated crash before the index rename")
        real_replace(src, dst)

    monkeypatch.setattr(indexed_writer.os, "replace", replace_failing_on_index)
    with pytest.raises(OSError, match="simulated crash"):
        preprocess(config(tmp_path, [second], sp_path))
    assert not _IndexedDataset.exists(prefix)  # the stale .idx is gone, not paired with the new .bin


def test_dtype_follows_vocabulary_size(tmp_path, sp_path, monkeypatch):
    assert indexed_writer.optimal_dtype(65499) == np.uint16
    assert indexed_writer.optimal_dtype(65500) == np.int32

    big = load_tokenizer(sp_path)
    big.vocab_size = 100_000  # pretend a large vocabulary; the ids stay the same

    monkeypatch.setattr("megatron_ct.preprocess.pipeline.load_tokenizer", lambda path: big)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    summary = preprocess(config(tmp_path, [src], sp_path))
    prefix = str(tmp_path / "out" / "corpus_text_document")
    assert summary["dtype"] == "int32" and IndexedDataset(prefix).index.dtype == np.int32
    assert read_ids(prefix) == [big.encode(d) + [big.eod_id] for d in DOCS]


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing-file", "does not exist"),
        ("empty-glob", "matches no file"),
        ("directory", "is a directory"),
        ("unknown-extension", "unknown extension"),
        ("bad-tokenizer", "tokenizer path"),
        ("text-with-json-keys", "need JSON-lines inputs"),
        ("zero-workers", "--workers"),
        ("both-key-modes", "pass only one of them"),
    ],
)
def test_bad_setup_fails_before_any_work(tmp_path, sp_path, case, fragment):
    good = write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}])
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "plain.txt").write_text("text\n")
    inputs, tokenizer, extra = [good], sp_path, {}
    named = str(tmp_path)
    if case == "missing-file":
        inputs, named = [good, str(tmp_path / "missing.jsonl")], str(tmp_path / "missing.jsonl")
    elif case == "empty-glob":
        inputs, named = [str(tmp_path / "*.parquet")], str(tmp_path / "*.parquet")
    elif case == "directory":
        inputs = [str(tmp_path)]
    elif case == "unknown-extension":
        inputs, named = [str(tmp_path / "notes.csv")], str(tmp_path / "notes.csv")
    elif case == "bad-tokenizer":
        tokenizer = named = str(tmp_path / "no_such_tokenizer.model")
    elif case == "text-with-json-keys":
        inputs, named = [str(tmp_path / "plain.txt")], str(tmp_path / "plain.txt")
        extra = {"json_keys": ["body"]}
    elif case == "zero-workers":
        extra, named = {"workers": 0}, "0"
    elif case == "both-key-modes":
        extra, named = {"json_keys": ["body"], "instruction_keys": ("q", "a")}, "--json-keys"
    with pytest.raises(PreprocessError) as info:
        preprocess(config(tmp_path, inputs, tokenizer, **extra))
    message = str(info.value)
    assert fragment in message and named in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_corrupt_gzip_aborts_without_final_files(tmp_path, sp_path):
    src = tmp_path / "broken.jsonl.gz"
    lines = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000))
    payload = gzip.compress(lines.encode())
    src.write_bytes(payload[: len(payload) // 2])  # truncated download
    with pytest.raises(PreprocessError, match="broken.jsonl.gz: cannot read past line"):
        preprocess(config(tmp_path, [str(src)], sp_path))
    assert os.listdir(tmp_path / "out") == []
