"""Long-context probes (megatron_ct/evaluation/long.py, tools/eval_long.py): the probes are what
they say, and a converted checkpoint at CP2 gives the figures transformers gives."""

from __future__ import annotations

import json

import pytest
from material import build_byte_level_tokenizer, english_lines, save_tiny_hf_llama

from megatron_ct.evaluation import long
from megatron_ct.tokenizer import load_tokenizer

from launch import REPO, run_torchrun

TOOL = REPO / "tools" / "eval_long.py"
LENGTHS = ["96", "160"]  # 160: past the model's max_position_embeddings (128), on purpose


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small random LLaMA with a byte-level tokenizer, its conversion, and held-out text."""
    from megatron_ct.convert.hf_to_ct import convert_hf_to_ct

    root = tmp_path_factory.mktemp("eval_long")
    hf = root / "hf"
    build_byte_level_tokenizer(hf)
    save_tiny_hf_llama(hf, tie_word_embeddings=False, initializer_range=0.2)
    convert_hf_to_ct(str(hf), str(root / "ct"), progress=False)
    lines = english_lines(2400)
    (root / "book.txt").write_text("\n".join(lines[:300]), encoding="utf-8")
    (root / "held_out.txt").write_text("\n\n".join(" ".join(lines[i : i + 40]) for i in range(2000, 2400, 40)))
    return root


def test_probes_have_the_length_and_the_key_at_its_depth(setup):
    tok = load_tokenizer(str(setup / "hf"))
    hay = long.haystack_ids(tok, None)
    probes = long.build_probes(tok, hay, [96, 200], [0.0, 0.5, 1.0], trials=3, seed=1)
    assert len(probes) == 2 * 3 * 3 and len({p.key for p in probes}) > 1
    head = len(tok.encode(long.INTRO)) + (tok.bos_id is not None)
    question = tok.encode(long.QUESTION)
    for p in probes:
        assert len(p.context) + len(p.answer) == p.length
        assert tok.decode(p.answer) == " " + p.key
        assert p.context[-len(question) :] == question
        stated = tok.encode(long.needle(p.key))
        starts = [i for i in range(len(p.context)) if p.context[i : i + len(stated)] == stated]
        assert len(starts) == 1  # stated once
        fill = p.length - head - len(stated) - len(question) - len(p.answer)  # haystack tokens
        assert starts[0] == head + round(p.depth * fill)
    with pytest.raises(Exception, match="--lengths: expected lengths above"):
        long.build_probes(tok, hay, [20], [0.5], trials=1)


def test_retrieval_scores_cell_by_cell_under_a_token_progress_bar(setup, capsys):
    """A 16k-token row takes minutes on a CPU: the bar counts tokens (rate, ETA) and moves per
    (length, depth) cell; without ``progress`` nothing is printed."""
    tok = load_tokenizer(str(setup / "hf"))
    probes = long.build_probes(tok, long.haystack_ids(tok, None), [96, 160], [0.0, 1.0], trials=2)
    calls = []

    class CountingLM:
        def loglikelihood(self, pairs):
            calls.append(len(pairs))
            return [(-1.0 - len(c) / 1000, True) for c, _ in pairs]

    quiet = long.retrieval_records(CountingLM(), probes, "passkey")
    assert capsys.readouterr().err == ""
    shown = long.retrieval_records(CountingLM(), probes, "passkey", progress=True)
    assert shown == quiet and calls == [2] * 8  # one cell at a time, twice
    assert [(r["length"], r["depth"], r["trials"]) for r in shown] == [(n, d, 2) for n in (96, 160) for d in (0.0, 1.0)]
    err = capsys.readouterr().err
    assert "passkey" in err and "100%" in err and "tok/s" in err and "1.02k/1.02k" in err  # 4 x 2 x (96 + 160)


def test_heatmap_panels_give_accuracy_and_key_logprob_per_cell(monkeypatch, tmp_path):
    """A panel per label, each cell its accuracy and mean key log-probability (with one key a
    cell, accuracy alone says little); one row label for all panels."""
    pytest.importorskip("matplotlib")
    import megatron_ct.plotting as plotting

    drawn = {}
    monkeypatch.setattr(plotting, "save_png", lambda fig, path: drawn.setdefault("fig", fig) and str(path))
    recs = [{"task": "passkey", "label": label, "length": n, "depth": 0.5, "trials": 1, "accuracy": acc,
             "key_logprob": lp} for label, n, acc, lp in
            (("base", 8192, 1.0, -1.15), ("base", 16384, 0.0, -30.56), ("after", 8192, 0.0, -2.51),
             ("after", 16384, 1.0, -1.65))]  # fmt: skip
    long.plot_heatmaps(recs, str(tmp_path / "h.png"))
    base, after = [ax for ax in drawn["fig"].axes if ax.get_title()]
    assert base.get_title() == "passkey: base" and after.get_title() == "passkey: after"
    assert [t.get_text() for t in base.texts] == ["1.00\nkey log p -1.1", "0.00\nkey log p -30.6"]
    assert [t.get_text() for t in after.texts] == ["0.00\nkey log p -2.5", "1.00\nkey log p -1.6"]
    assert base.get_ylabel() == "depth of the key" and after.get_ylabel() == ""


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines()]


@pytest.mark.slow
def test_cp2_checkpoint_gives_transformers_figures_and_a_heatmap(setup, tmp_path):
    common = ["--lengths", *LENGTHS, "--depths", "0", "0.5", "1", "--trials", "2", "--haystack",
              str(setup / "book.txt"), "--position-text", str(setup / "held_out.txt"), "--bucket", "64"]  # fmt: skip
    hf_out, ct_out = tmp_path / "hf.jsonl", tmp_path / "ct.jsonl"
    run_torchrun(1, TOOL, ["--checkpoint", str(setup / "hf"), "--output", str(hf_out), "--label", "hf", *common])
    run_torchrun(
        2,
        TOOL,
        ["--checkpoint", str(setup / "ct"), "--context-parallel-size", "2", "--output", str(ct_out),
         "--label", "ct", "--heatmap", str(tmp_path / "long.png"), *common],
    )  # fmt: skip
    want, got = records(hf_out), records(ct_out)
    assert [(r["task"], r.get("length"), r.get("depth"), r.get("start")) for r in got] == [
        (r["task"], r.get("length"), r.get("depth"), r.get("start")) for r in want
    ]
    tasks = {r["task"] for r in got}
    assert tasks == {"passkey", "needle", "position"}
    for a, b in zip(got, want, strict=True):
        if a["task"] == "position":
            assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        else:
            assert a["trials"] == 2 and a["accuracy"] == b["accuracy"]
            assert a["key_logprob"] == pytest.approx(b["key_logprob"], abs=1e-3)
    assert max(r["end"] for r in got if r["task"] == "position") == 160  # rows as long as the longest probe
    assert (tmp_path / "long.png").stat().st_size > 1000
