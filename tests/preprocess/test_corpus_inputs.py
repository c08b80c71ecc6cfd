"""preprocess() at corpus scale: parquet and datasets folders in, sharded runs, refusals, unknown ids.

The reference everywhere is the JSON-lines run of the same documents: another input format,
a sharded run or a merge must give the same ids (byte-identical files where the order is the same).
"""

from __future__ import annotations

import json
import logging
import os

import pytest

pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")

from material import llama_sp_model_path  # noqa: E402

from megatron_ct.data.indexed import open_indexed, read_meta  # noqa: E402
from megatron_ct.errors import DataError  # noqa: E402
from megatron_ct.preprocess import encode as encode_module  # noqa: E402
from megatron_ct.preprocess.inputs import Unit, select_shard  # noqa: E402
from megatron_ct.preprocess.merge import merge_datasets  # noqa: E402
from megatron_ct.preprocess.pipeline import (  # noqa: E402
    PreprocessConfig,
    PreprocessError,
    format_summary,
    output_prefixes,
    preprocess,
)
from megatron_ct.tokenizer import load_tokenizer  # noqa: E402

TEXTS = [
    "Hello world. This is the first document.",
    "中文文档：今天天气很好，我们去公园散步。",
    "Multi-line\ndocument with\ttabs and  double  spaces.",
    "Mixed 中英 text with emoji 🦙 and numbers 12345.",
    "Last one of the first batch.",
]
DOCS = [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(57)]


@pytest.fixture(scope="module")
def sp_path() -> str:
    return llama_sp_model_path()


def run(tmp_path, inputs, tokenizer, name="out", **kwargs) -> tuple[dict, str]:
    cfg = PreprocessConfig(
        inputs=[str(i) for i in inputs],
        output_prefix=str(tmp_path / name / "corpus"),
        tokenizer=tokenizer,
        progress=False,
        **kwargs,
    )
    summary = preprocess(cfg)
    return summary, output_prefixes(cfg)["text"]


def ids(prefix: str) -> list[list[int]]:
    data = open_indexed(prefix)
    return [data.get(i).tolist() for i in range(len(data))]


def files(prefix: str) -> tuple[bytes, bytes]:
    return tuple(open(prefix + ext, "rb").read() for ext in (".bin", ".idx"))


def write_jsonl(path, texts) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "n": len(t)}, ensure_ascii=False) + "\n")
    return str(path)


def write_parquet(path, texts, row_group_size: int) -> str:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sp_path) -> str:
    """The JSON-lines run of DOCS: the prefix every other input must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    _, prefix = run(tmp, [write_jsonl(tmp / "docs.jsonl", DOCS)], sp_path)
    return prefix


def test_parquet_streamed_by_row_group_gives_the_jsonl_ids(tmp_path, sp_path, reference):
    src = write_parquet(tmp_path / "docs.parquet", DOCS, row_group_size=10)  # 6 row groups
    summary, prefix = run(tmp_path, [src], sp_path, chunk_lines=4)
    assert files(prefix) == files(reference)
    assert summary["docs"] == len(DOCS) and summary["units"] == 6


def test_parquet_nulls_and_bad_columns(tmp_path, sp_path, caplog):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["one", None, "", "four"], "score": [1, 2, 3, 4]})
    pq.write_table(table, str(tmp_path / "t.parquet"))
    with caplog.at_level(logging.WARNING, logger="megatron_ct"):
        summary, prefix = run(tmp_path, [tmp_path / "t.parquet"], sp_path)
    tok = load_tokenizer(sp_path)
    assert [tok.decode(d[:-1]) for d in ids(prefix)] == ["one", "four"]
    assert summary["skipped"] == {"missing_key": 1, "empty": 1}
    assert f"{tmp_path / 't.parquet'}[row 1]: skipped row (missing_key: 'text' is null)" in caplog.text
    for keys, message in [(["body"], "no column 'body'; expected"), (["score"], "column 'score' is int64")]:
        with pytest.raises(PreprocessError, match=message):
            run(tmp_path, [tmp_path / "t.parquet"], sp_path, name="bad", json_keys=keys)
        assert not (tmp_path / "bad").exists()  # refused before any output


def test_datasets_save_to_disk_folder_gives_the_jsonl_ids(tmp_path, sp_path, reference):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=2)  # two .arrow files
    summary, prefix = run(tmp_path, [tmp_path / "hf"], sp_path, chunk_lines=8)
    assert files(prefix) == files(reference)
    assert len(summary["inputs"]) == 2 and all(p.endswith(".arrow") for p in summary["inputs"])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(PreprocessError, match=r"is a DatasetDict with splits train, test; pass one split's folder"):
        run(tmp_path, [tmp_path / "dd"], sp_path, name="dd")


def test_zstd_jsonl_gives_the_jsonl_ids(tmp_path, sp_path, reference):
    zstandard = pytest.importorskip("zstandard")
    raw = open(write_jsonl(tmp_path / "d.jsonl", DOCS), "rb").read()
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    _, prefix = run(tmp_path, [tmp_path / "d.jsonl.zst"], sp_path, chunk_lines=5)
    assert files(prefix) == files(reference)


def test_orjson_and_the_standard_library_write_the_same(tmp_path, sp_path, monkeypatch):
    pytest.importorskip("orjson")
    lines = [
        '\ufeff{"text": "byte-order mark first"}',
        '{"text": "NaN is not JSON but Python accepts it", "x": NaN}',
        '{"text": "duplicate", "text": "last one wins"}',
        '{"text": "escapes \\u4e2d\\u6587 \\n newline"}',
        '{"text": "lone \\ud800 surrogate"}',
        '{"text": 5}',
        "[1, 2]",
        '{"text": "ok"}',
        "",
    ]
    (tmp_path / "tricky.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    fast, fast_prefix = run(tmp_path, [tmp_path / "tricky.jsonl"], sp_path, name="orjson")
    monkeypatch.setattr(encode_module, "orjson", None)
    slow, slow_prefix = run(tmp_path, [tmp_path / "tricky.jsonl"], sp_path, name="stdlib")
    assert files(fast_prefix) == files(slow_prefix)
    assert fast["skipped"] == slow["skipped"] == {"invalid_json": 1, "invalid_utf8": 1, "not_string": 1, "empty": 1}
    tok = load_tokenizer(sp_path)
    assert [tok.decode(d[:-1]) for d in ids(fast_prefix)][1:3] == [
        "NaN is not JSON but Python accepts it",
        "last one wins",
    ]


# --- sharding ------------------------------------------------------------------------------------
def test_select_shard_is_contiguous_balanced_and_complete():
    units = [Unit(i, None, size) for i, size in enumerate([100, 1, 1, 1, 300, 50, 50, 0, 200, 100])]
    for n in range(1, len(units) + 1):
        shards = [select_shard(units, k, n) for k in range(n)]
        assert [u for s in shards for u in s] == units  # in order, nothing twice, nothing missing
        assert all(shards)  # no shard without work
    halves = [sum(u.size for u in select_shard(units, k, 2)) for k in range(2)]
    assert halves == [403, 400]  # of 803 bytes
    with pytest.raises(PreprocessError, match="only 10 unit"):
        select_shard(units, 0, 11)


def test_sharded_runs_read_together_are_the_unsharded_run(tmp_path, sp_path):
    # Units: 3 + 2 parquet row groups, a JSONL file, a datasets folder: 7 units over 3 shards.
    a = write_parquet(tmp_path / "a.parquet", DOCS[:15], row_group_size=5)
    b = write_parquet(tmp_path / "b.parquet", DOCS[15:30], row_group_size=8)
    c = write_jsonl(tmp_path / "c.jsonl", DOCS[30:45])
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS[45:]}).save_to_disk(str(tmp_path / "d"))
    inputs = [a, b, c, tmp_path / "d"]
    whole, whole_prefix = run(tmp_path, inputs, sp_path, name="whole")
    shard_prefixes = []
    for k in range(3):
        summary, prefix = run(tmp_path, inputs, sp_path, name="shards", shard_index=k, num_shards=3, workers=2)
        assert prefix == str(tmp_path / "shards" / f"corpus-{k:05d}-of-00003_text_document")
        assert summary["summary"] == str(tmp_path / "shards" / f"corpus-{k:05d}-of-00003_summary.json")
        assert read_meta(prefix).extra["shard"] == [k, 3]
        shard_prefixes.append(prefix)
    assert sum(len(ids(p)) for p in shard_prefixes) == whole["docs"] == len(DOCS)
    assert [d for p in shard_prefixes for d in ids(p)] == ids(whole_prefix)
    meta = merge_datasets([str(tmp_path / "shards" / "corpus-*-of-00003_text_document")], str(tmp_path / "m"))
    assert files(str(tmp_path / "m")) == files(whole_prefix)
    assert (
        meta.tokenizer == read_meta(whole_prefix).tokenizer
        and meta.max_token_id == read_meta(whole_prefix).max_token_id
    )


def test_shard_defaults_come_from_the_slurm_array(tmp_path, sp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    cfg = PreprocessConfig(inputs=["x"], output_prefix="out/c", tokenizer=sp_path)
    assert (cfg.shard_index, cfg.num_shards) == (1, 2)
    assert output_prefixes(cfg) == {"text": "out/c-00001-of-00002_text_document"}
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")  # --array=4-9:5 is not dense
    with pytest.raises(PreprocessError, match="--shard-index 5 .* outside 0..1"):
        PreprocessConfig(inputs=["x"], output_prefix="out/c", tokenizer=sp_path)


# --- refusals and warnings -----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["wrong-json-keys", "empty-input", "only-blank-lines"])
def test_zero_document_output_is_refused_and_leaves_nothing(tmp_path, sp_path, case):
    src = tmp_path / "d.jsonl"
    keys = ["text"]
    if case == "wrong-json-keys":
        write_jsonl(src, DOCS[:5])
        keys = ["content"]
    elif case == "empty-input":
        src.write_text("")
    else:
        src.write_text("\n  \n\n")
    with pytest.raises(PreprocessError) as err:
        run(tmp_path, [src], sp_path, json_keys=keys)
    message = str(err.value)
    assert message.startswith("no document to write") and "\n" not in message
    if case == "wrong-json-keys":
        assert "missing_key=5" in message and "check --json-keys" in message and "content" in message
    assert os.listdir(tmp_path / "out") == []  # no .bin/.idx/.meta.json, no summary, no .tmp


def test_unknown_id_share_is_reported_and_warned_above_a_tenth_of_a_percent(tmp_path, caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A word-level vocabulary that knows English words only: Chinese text is all [UNK].
    words = sorted({w for t in TEXTS for w in t.split() if w.isascii()})
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(str(tmp_path / "wordlevel"))
    src = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    with caplog.at_level(logging.WARNING, logger="megatron_ct"):
        summary, prefix = run(tmp_path, [src], str(tmp_path / "wordlevel"))
    data = [t for d in ids(prefix) for t in d[:-1]]  # EOD not counted
    assert summary["unk_id"] == 0 and summary["unknown_ids"] == data.count(0) > 0
    assert summary["unknown_id_share"] == pytest.approx(data.count(0) / summary["tokens"])
    assert read_meta(prefix).unknown_ids == data.count(0)
    assert "of the ids written are the unknown id 0" in caplog.text
    assert "WARNING: above 0.1%" in format_summary(summary)


def test_no_warning_for_a_tokenizer_that_covers_the_text(tmp_path, sp_path, caplog, reference):
    meta = read_meta(reference)
    assert meta.unknown_ids == 0 and meta.unknown_id_share == 0.0
    assert meta.max_token_id == max(max(d) for d in ids(reference))
    assert meta.tokenizer["vocab_size"] == 32000 and meta.tokenizer["eod_id"] == 2
    assert meta.tokenizer["file"] == os.path.basename(sp_path)


def test_merge_refuses_different_tokenizers_and_an_existing_output(tmp_path, sp_path, reference):
    from material import build_hf_llama_tokenizer

    hf_dir = build_hf_llama_tokenizer(tmp_path / "hf")
    # Same vocabulary, but the HF conversion tokenizes double spaces differently: another tokenization.
    _, other = run(tmp_path, [write_jsonl(tmp_path / "d.jsonl", DOCS)], hf_dir, name="hf_out")
    with pytest.raises(DataError, match=r"tokenized with tokenizer.json .* but .* with tokenizer"):
        merge_datasets([reference, other], str(tmp_path / "m"))
    merge_datasets([reference], str(tmp_path / "m"))
    with pytest.raises(PreprocessError, match="m.idx exists; pass --overwrite"):
        merge_datasets([reference], str(tmp_path / "m"))
    with pytest.raises(PreprocessError, match="is one of the inputs"):
        merge_datasets([reference], reference, overwrite=True)
