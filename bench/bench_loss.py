#!/usr/bin/env python
"""Peak memory and time of the output layer + cross-entropy: megatron-core's plain path vs chunked.

    python bench/bench_loss.py                      # GPU if visible: 8k tokens, hidden 4096, vocab 152k, bf16
    python bench/bench_loss.py --device cpu         # reduced CPU shape (fp32)

Both paths run forward and backward of ``sum(loss_mask * per-token loss)`` on the same inputs
(``hidden [s, b, h]``, this rank's output weight ``[V, h]``, labels), TP1:

- plain: the ``[s, b, V]`` logits (``ColumnParallelLinear``'s GEMM), the padding filled with
  -inf, megatron-core's ``vocab_parallel_cross_entropy`` (what GPTModel does);
- chunked: megatron_ct.model.chunked_loss (``model.loss_chunk_size``).

Peak memory is what the pass adds on top of its inputs: ``torch.cuda.max_memory_allocated``
on GPU; on CPU the growth of the process's peak RSS, each measurement in a fresh process.
Runs alternate plain, chunked, plain, chunked ... (``--pairs``); medians and their ratio are
printed with the machine, the largest differences of loss and gradients between the paths,
and a JSON line appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPES = {
    # 8k tokens per micro-batch, LLaMA-7B width, Qwen2's 152k vocabulary (151936 padded to 152064).
    "cuda": dict(seq=4096, batch=2, hidden=4096, vocab=151936, padded=152064, chunk=1024, dtype="bf16"),
    "cpu": dict(seq=1024, batch=1, hidden=256, vocab=151936, padded=152064, chunk=128, dtype="fp32"),
}


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(li.split(":", 1)[1].strip() for li in f if li.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}"


def init_single_process(device: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ct.parallel.launch import tcp_init_method

    if device == "cpu":
        from megatron_ct.parallel.device import activate_cpu_device_layer

        activate_cpu_device_layer()
    dist.init_process_group("gloo", init_method=tcp_init_method(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def make_inputs(shape: dict, device: str):
    import torch

    from megatron_ct.dtypes import DTYPES

    dtype = DTYPES[shape["dtype"]]
    g = torch.Generator(device=device).manual_seed(0)
    s, b, h = shape["seq"], shape["batch"], shape["hidden"]
    hidden = torch.randn(s, b, h, device=device, generator=g).to(dtype).requires_grad_()  # [s, b, h]
    weight = (torch.randn(shape["padded"], h, device=device, generator=g) * h**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, shape["vocab"], (b, s), device=device, generator=g)  # [b, s]
    loss_mask = (torch.rand(b, s, device=device, generator=g) > 0.1).float()
    return hidden, weight, labels, loss_mask


def loss_fn(path: str, shape: dict):
    import torch

    from megatron_ct.model.chunked_loss import chunked_lm_loss
    from megatron_ct.model.output import fill_padded_vocab_

    def plain(hidden, weight, labels):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = torch.matmul(hidden, weight.t())  # [s, b, V]
        fill_padded_vocab_(logits, 0, shape["vocab"])
        return vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()  # [b, s]

    def chunked(hidden, weight, labels):
        return chunked_lm_loss(hidden, weight, labels, shape["chunk"], shape["vocab"], sequence_parallel=False)

    return {"plain": plain, "chunked": chunked}[path]


def one_pass(path: str, shape: dict, inputs) -> tuple[float, object]:
    import torch

    hidden, weight, labels, loss_mask = inputs
    hidden.grad = weight.grad = None
    if hidden.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = loss_fn(path, shape)(hidden, weight, labels)
    (loss * loss_mask).sum().backward()
    if hidden.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, loss.detach()


def worker(path: str, shape: dict, save: str | None) -> None:
    """CPU: one measurement in this fresh process; prints a JSON line."""
    import torch

    init_single_process("cpu")
    inputs = make_inputs(shape, "cpu")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    seconds, loss = one_pass(path, shape, inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    if save:
        torch.save({"loss": loss, "d_hidden": inputs[0].grad, "d_weight": inputs[1].grad}, save)
    print(json.dumps({"path": path, "seconds": seconds, "peak_bytes": peak}))


def run_cpu(shape: dict, pairs: int) -> tuple[dict, dict]:
    from megatron_ct.parallel.launch import child_env

    results: dict[str, list[dict]] = {"plain": [], "chunked": []}
    with tempfile.TemporaryDirectory() as tmp:
        saved = {}
        for i in range(pairs):
            for path in ("plain", "chunked"):
                cmd = [sys.executable, __file__, "--worker", path, "--shape", json.dumps(shape)]
                if i == 0:
                    saved[path] = os.path.join(tmp, f"{path}.pt")
                    cmd += ["--save", saved[path]]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
                if proc.returncode:
                    sys.exit(f"worker failed:\n{proc.stderr[-3000:]}")
                results[path].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"  pair {i + 1}/{pairs} {path:8} {results[path][-1]['seconds']:.2f}s", flush=True)
        import torch

        a, b = torch.load(saved["plain"]), torch.load(saved["chunked"])
        diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    return results, diffs


def run_cuda(shape: dict, pairs: int) -> tuple[dict, dict]:
    import torch

    init_single_process("cuda")
    inputs = make_inputs(shape, "cuda")
    results: dict[str, list[dict]] = {"plain": [], "chunked": []}
    grads = {}
    one_pass("chunked", shape, inputs)  # warm-up (cuBLAS handles, allocator)
    for i in range(pairs):
        for path in ("plain", "chunked"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            seconds, loss = one_pass(path, shape, inputs)
            peak = torch.cuda.max_memory_allocated() - base
            results[path].append({"path": path, "seconds": seconds, "peak_bytes": peak})
            if i == 0:
                grads[path] = {"loss": loss, "d_hidden": inputs[0].grad.clone(), "d_weight": inputs[1].grad.clone()}
    a, b = grads["plain"], grads["chunked"]
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    return results, diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--pairs", type=int, default=3, help="plain/chunked pairs, alternated")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--chunk", type=int, help="sequence positions per chunk (model.loss_chunk_size)")
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "bench_loss"), help="directory for bench_loss.jsonl")
    ap.add_argument("--json", help="also write this run's record to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.worker:
        worker(args.worker, json.loads(args.shape), args.save)
        return

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shape = dict(SHAPES[device])
    for key in ("seq", "batch", "hidden", "chunk"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    print(f"machine: {machine(device)}")
    print(f"shape: {shape}")
    results, diffs = (run_cuda if device == "cuda" else run_cpu)(shape, args.pairs)
    med = {p: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_bytes")} for p, rs in results.items()}
    logits_bytes = shape["seq"] * shape["batch"] * shape["padded"] * 4
    print(f"\none FP32 copy of the [s, b, V] logits: {logits_bytes / 2**20:.0f} MiB")
    print(f"{'path':10} {'peak MiB':>10} {'time s':>8}")
    for p in ("plain", "chunked"):
        print(f"{p:10} {med[p]['peak_bytes'] / 2**20:>10.0f} {med[p]['seconds']:>8.3f}")
    mem_ratio = med["chunked"]["peak_bytes"] / max(med["plain"]["peak_bytes"], 1)
    time_ratio = med["chunked"]["seconds"] / med["plain"]["seconds"]
    print(f"chunked / plain: peak memory {mem_ratio:.2f}x, time {time_ratio:.2f}x (medians of {args.pairs} pairs)")
    print("max |difference| chunked vs plain: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    record = {
        "bench": "loss",
        "machine": machine(device),
        "device": device,
        "shape": shape,
        "median": med,
        "peak_ratio": mem_ratio,
        "time_ratio": time_ratio,
        "max_abs_diff": diffs,
        "runs": results,
        "time": time.time(),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_loss.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
