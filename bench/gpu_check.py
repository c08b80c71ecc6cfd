#!/usr/bin/env python
"""The one-shot GPU check's runs (bench/gpu_check.sh sets up the environment and calls this).

On one GPU, TP1, a LLaMA-7B-width slice (4 layers, hidden 4096, 32 heads, FFN 11008, sequence
4096, micro-batch 1, global batch 8, bf16; bench/bench_train.py's "gpu" shape), in this order,
each item skipped when the time budget (``GPU_CHECK_BUDGET_S``, counted from the shell's start)
would be exceeded:

1. ``pretrain_ct.py`` for each attention backend (local, sdpa, flex; te when Transformer
   Engine is importable), ``GPU_CHECK_STEPS`` steps (50) on the synthetic stream: median
   tokens/s, TFLOP/s, MFU after the warm-up steps, peak memory, and each backend's loss against
   local's over the first 10 steps (same initial weights and data);
2. the loss path at vocabulary 152k: bench/bench_loss.py (plain vs chunked, 8k tokens, peak
   memory, time, max differences), then 10 training steps each with the plain and the chunked
   loss (``model.loss_chunk_size=1024``);
3. packed documents (a random-token indexed dataset, reset_attention_mask): local vs flex;
4. kernels: bench/bench_numerics.py (RMSNorm eager/compiled, attention modules, SwiGLU);
5. upstream Megatron-LM's ``pretrain_gpt.py`` on the same shape (local transformer impl, mock
   data) when a Megatron-LM tree is carried (``GPU_CHECK_UPSTREAM`` or ``.whl/Megatron-LM``).

Writes ``gpu_check.json`` (everything, with every run's per-step records) and ``gpu_check.md``
(the table for bench/README.md) to ``--out``, and prints the table. A run that fails is recorded
with its error tail; the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_train import SHAPES, machine, shape_overrides  # noqa: E402

from megatron_ct.parallel.launch import child_env, torchrun_command  # noqa: E402

SLICE = SHAPES["gpu"]
T0 = float(os.environ.get("GPU_CHECK_T0", time.time()))  # the shell's start: setup time counts
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", 440))
STEPS = int(os.environ.get("GPU_CHECK_STEPS", 50))
WARMUP = 5  # steps excluded from the medians (first-step compilation, allocator growth)
LOSS_STEPS = 10  # steps over which backends' losses are compared with local's
QWEN_VOCAB = 151936  # Qwen2's vocabulary; padded to 152064


def elapsed() -> float:
    return time.time() - T0


def time_left(estimate_s: float) -> float:
    """Timeout for an item: twice its estimate, but never past the budget (+15 s to write up)."""
    return max(30.0, min(2 * estimate_s, BUDGET_S + 15 - elapsed()))


def slice_overrides(shape: dict = SLICE) -> list[str]:
    return [
        *shape_overrides(shape),
        "parallel.device=cuda",
        "logging.log_interval=1",
        "optim.lr=1e-4",
        "optim.min_lr=1e-5",
        "optim.lr_warmup_iters=0",
    ]


def tail(text: str, n: int = 2500) -> str:
    return text[-n:] if text else ""


def train_run(name: str, steps: int, extra: list[str], timeout: float) -> dict:
    """pretrain_ct.py under torchrun on this GPU; a summary plus the per-step records."""
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        args = [*slice_overrides(), f"train.train_iters={steps}", f"logging.log_dir={tmp}", *extra]
        cmd = torchrun_command(1, REPO / "pretrain_ct.py", args)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired as e:
            return {"name": name, "status": f"timeout after {timeout:.0f}s", "stderr": tail(str(e.stderr))}
        metrics = Path(tmp) / "metrics.jsonl"
        records = [json.loads(li) for li in metrics.read_text().splitlines()] if metrics.exists() else []
    startup = [li for li in proc.stderr.splitlines() if "attention:" in li or "model:" in li]
    if proc.returncode != 0 or not records:
        return {"name": name, "status": f"failed (rc={proc.returncode})", "stderr": tail(proc.stderr)}
    timed = [r for r in records if r["iteration"] > min(WARMUP, len(records) // 3)]
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "name": name,
        "status": "ok",
        "overrides": extra,
        "steps": len(records),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "tflops_per_device": statistics.median(r["tflops_per_device"] for r in timed),
        "mfu": statistics.median(mfus) if mfus else None,
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "peak_memory_gib": max(r["memory_gib"] for r in records),
        "losses": [r["loss"] for r in records],
        "wall_s": time.time() - t0,
        "startup_log": startup[-3:],
        "records": records,
    }


def compare_losses(runs: dict, reference: str, names: list[str]) -> None:
    ref = runs.get(reference)
    if not ref or ref.get("status") != "ok":
        return
    for name in names:
        run = runs.get(name)
        if run and run.get("status") == "ok" and name != reference:
            n = min(LOSS_STEPS, len(run["losses"]), len(ref["losses"]))
            diffs = [abs(a - b) for a, b in zip(run["losses"][:n], ref["losses"][:n], strict=True)]
            run["vs"] = reference
            run["loss_max_abs_diff_first_steps"] = max(diffs)
            run["loss_diffs_first_steps"] = diffs


def documents_dataset(root: Path) -> str:
    """Random-token documents (lognormal lengths, mean ~900 tokens) as one indexed dataset."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(root / "docs_text_document")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(3000):  # ~2.7M tokens: enough for 40 steps of 8 x 4097
        doc = rng.integers(1, SLICE["vocab_size"], int(rng.lognormal(6.5, 0.7)) + 2).astype(np.uint16)
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def run_script(name: str, cmd: list[str], timeout: float, env: dict | None = None, cwd=REPO) -> dict:
    t0 = time.time()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired as e:
        return {"name": name, "status": f"timeout after {timeout:.0f}s", "stdout": tail(str(e.stdout))}
    status = "ok" if proc.returncode == 0 else f"failed (rc={proc.returncode})"
    return {
        "name": name,
        "status": status,
        "stdout": tail(proc.stdout, 6000),
        "stderr": tail(proc.stderr),
        "wall_s": time.time() - t0,
    }


def upstream_run(tree: Path, steps: int, timeout: float) -> dict:
    """Megatron-LM's pretrain_gpt.py on the same shape (its own megatron/core from ``tree``)."""
    s = SLICE
    args = [
        "--num-layers", str(s["num_layers"]), "--hidden-size", str(s["hidden_size"]),
        "--num-attention-heads", str(s["num_attention_heads"]), "--ffn-hidden-size", str(s["ffn_hidden_size"]),
        "--seq-length", str(s["seq_length"]), "--max-position-embeddings", str(s["seq_length"]),
        "--micro-batch-size", str(s["micro_batch_size"]), "--global-batch-size", str(s["global_batch_size"]),
        "--train-iters", str(steps), "--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "cosine",
        "--bf16", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
        "--attention-softmax-in-fp32", "--transformer-impl", "local", "--no-masked-softmax-fusion",
        "--no-gradient-accumulation-fusion", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(s["vocab_size"]), "--log-interval", "1", "--eval-iters", "0",
        "--log-throughput", "--seed", "1234",
    ]  # fmt: skip
    cmd = torchrun_command(1, "pretrain_gpt.py", args)
    result = run_script("upstream pretrain_gpt.py", cmd, timeout, env={"PYTHONPATH": str(tree)}, cwd=tree)
    text = result.get("stdout", "") + result.get("stderr", "")
    ms = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", text)]
    tflops = [float(x) for x in re.findall(r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+)", text)]
    if ms:
        timed = ms[WARMUP:] or ms
        step_s = statistics.median(timed) / 1e3
        result.update(step_time_s=step_s, tokens_per_s=s["global_batch_size"] * s["seq_length"] / step_s)
    if tflops:
        result["tflops_per_device_reported"] = statistics.median(tflops[WARMUP:] or tflops)
    return result


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(report: dict) -> str:
    lines = [
        f"GPU check, {report['date']}: {report['machine']}; megatron-core {report['megatron_core']}",
        "",
        "| run | status | tokens/s | TFLOP/s | MFU | peak GiB | ms/step | max abs Δloss, first steps |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in report["runs"]:
        ok = run.get("status") == "ok"
        mfu = run.get("mfu")
        dloss = run.get("loss_max_abs_diff_first_steps")
        step = run.get("step_time_s")
        cells = [
            run["name"],
            run["status"],
            _fmt(run.get("tokens_per_s"), ".0f") if ok else "",
            _fmt(run.get("tflops_per_device", run.get("tflops_per_device_reported")), ".1f") if ok else "",
            f"{100 * mfu:.1f}%" if ok and mfu is not None else "",
            _fmt(run.get("peak_memory_gib"), ".1f") if ok else "",
            _fmt(None if step is None else 1e3 * step, ".0f") if ok else "",
            f"{dloss:.2e} vs {run['vs']}" if dloss is not None else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for key, value in report.get("ratios", {}).items():
        lines.append(f"\n{key}: {value:.2f}x")
    loss = report.get("loss_bench")
    if loss and "record" in loss:
        r = loss["record"]
        sh, med = r["shape"], r["median"]
        lines.append(
            f"\nloss path at vocab {sh['vocab']} ({sh['seq'] * sh['batch']} tokens, hidden {sh['hidden']}, chunk "
            f"{sh['chunk']}): peak {med['plain']['peak_bytes'] / 2**30:.2f} -> "
            f"{med['chunked']['peak_bytes'] / 2**30:.2f} GiB ({r['peak_ratio']:.2f}x), "
            f"time {r['time_ratio']:.2f}x; max abs diff "
            + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff"].items())
        )
    for item in report.get("skipped", []):
        lines.append(f"\nskipped: {item}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu_check"))
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(2)
    import megatron.core

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine("cuda"),
        "python": sys.version.split()[0],
        "megatron_core": megatron.core.__version__,
        "shape": SLICE,
        "steps": STEPS,
        "budget_s": BUDGET_S,
        "runs": [],
        "skipped": [],
    }
    runs: dict[str, dict] = {}

    def save() -> None:
        report["elapsed_s"] = elapsed()
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out / "gpu_check.json")

    def fits(what: str, estimate_s: float) -> bool:
        if elapsed() + estimate_s > BUDGET_S:
            report["skipped"].append(f"{what} (needs ~{estimate_s:.0f}s, {BUDGET_S - elapsed():.0f}s left)")
            print(f"[{elapsed():5.0f}s] skip {what}: not enough time left", flush=True)
            return False
        print(f"[{elapsed():5.0f}s] {what}", flush=True)
        return True

    def record(run: dict) -> None:
        runs[run["name"]] = run
        report["runs"].append(run)
        brief = {k: run.get(k) for k in ("status", "tokens_per_s", "mfu", "peak_memory_gib")}
        print(f"          -> {brief}", flush=True)
        save()

    # 1. attention backends on plain causal data.
    from megatron_ct.model.llama import have_transformer_engine

    backends = ["local", "sdpa", "flex"] + (["te"] if have_transformer_engine() else [])
    per_run = 25 + 1.2 * STEPS  # start-up (+ compilation) and ~1 s per 32k-token step at worst
    for backend in backends:
        impl = "transformer_engine" if backend == "te" else "local"
        if fits(f"train {backend} ({STEPS} steps)", per_run):
            extra = [f"model.attention_backend={backend}", f"model.transformer_impl={impl}"]
            record(train_run(f"attention={backend}", STEPS, extra, timeout=time_left(per_run)))
    compare_losses(runs, "attention=local", [f"attention={b}" for b in backends])
    ratios = {}
    local = runs.get("attention=local", {})
    for b in backends[1:]:
        run = runs.get(f"attention={b}", {})
        if local.get("status") == "ok" and run.get("status") == "ok":
            ratios[f"tokens/s {b} / local"] = run["tokens_per_s"] / local["tokens_per_s"]
    report["ratios"] = ratios
    save()

    # 2. the loss path at a 152k vocabulary.
    if fits("bench_loss.py at vocab 152k", 60):
        loss_json = out / "bench_loss.json"
        res = run_script(
            "bench_loss",
            [sys.executable, str(REPO / "bench" / "bench_loss.py"), "--device", "cuda", "--json", str(loss_json),
             "--out", str(out)],
            timeout=time_left(60),
        )  # fmt: skip
        if loss_json.exists():
            res["record"] = json.loads(loss_json.read_text())
        report["loss_bench"] = res
        print(f"          -> {res['status']}", flush=True)
        save()
    vocab_steps = 10
    for name, extra in (("vocab152k plain loss", []), ("vocab152k chunked loss", ["model.loss_chunk_size=1024"])):
        if fits(f"train {name} ({vocab_steps} steps)", 60):
            overrides = [
                f"model.vocab_size={QWEN_VOCAB}",
                "model.attention_backend=sdpa",
                "model.transformer_impl=local",
            ]
            record(train_run(name, vocab_steps, overrides + extra, timeout=time_left(60)))
    compare_losses(runs, "vocab152k plain loss", ["vocab152k chunked loss"])

    # 3. packed documents: flex's block mask against local's dense mask.
    doc_steps = 20
    doc_run = 30 + 1.5 * doc_steps
    if fits("packed documents: local and flex", 2 * doc_run):
        with tempfile.TemporaryDirectory() as tmp:
            prefix = documents_dataset(Path(tmp))
            data = [
                f"data.datasets={{docs: {prefix}}}",
                "data.stages=[{name: docs, blend: {docs: 1}, reset_attention_mask: true, reset_position_ids: true}]",
                f"data.index_cache_dir={tmp}/cache",
            ]
            for backend in ("local", "flex"):
                extra = [f"model.attention_backend={backend}", "model.transformer_impl=local", *data]
                record(train_run(f"documents attention={backend}", doc_steps, extra, timeout=time_left(doc_run)))
        compare_losses(runs, "documents attention=local", ["documents attention=flex"])
        d_local, d_flex = runs.get("documents attention=local", {}), runs.get("documents attention=flex", {})
        if d_local.get("status") == "ok" and d_flex.get("status") == "ok":
            ratios["tokens/s documents flex / local"] = d_flex["tokens_per_s"] / d_local["tokens_per_s"]

    # 4. kernel micro-benchmarks.
    if fits("bench_numerics.py (kernels)", 90):
        cmd = [sys.executable, str(REPO / "bench" / "bench_numerics.py"), "--json", str(out / "bench_numerics.json")]
        res = run_script("bench_numerics", cmd, timeout=time_left(90))
        if (out / "bench_numerics.json").exists():
            res["record"] = json.loads((out / "bench_numerics.json").read_text())
        report["kernels"] = res
        print(f"          -> {res['status']}", flush=True)
        save()

    # 5. upstream Megatron-LM, same shape.
    tree = Path(os.environ.get("GPU_CHECK_UPSTREAM", REPO / ".whl" / "Megatron-LM"))
    if not (tree / "pretrain_gpt.py").exists():
        report["skipped"].append(f"upstream pretrain_gpt.py (no Megatron-LM tree at {tree})")
    elif fits("upstream Megatron-LM pretrain_gpt.py", 40 + 1.2 * 20):
        run = upstream_run(tree, 20, timeout=time_left(40 + 1.2 * 20))
        report["runs"].append(run)
        if local.get("status") == "ok" and run.get("tokens_per_s"):
            ratios["tokens/s ours local / upstream local"] = local["tokens_per_s"] / run["tokens_per_s"]
        print(f"          -> {run['status']}", flush=True)

    save()
    text = table(report)
    (out / "gpu_check.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {elapsed():.0f}s")


if __name__ == "__main__":
    main()
