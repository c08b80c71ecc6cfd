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
