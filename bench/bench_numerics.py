#!/usr/bin/env python
"""Forward+backward time and accuracy of RMSNorm and attention implementations, in bf16.

RMSNorm: megatron-core's own PyTorch norm (``WrappedTorchNorm`` = ``torch.nn.RMSNorm``, the
baseline), our FP32-statistics fallback, and Transformer Engine / apex when installed.
Attention: megatron-core's local ``DotProductAttention`` (softmax in fp32), PyTorch SDPA
(what HF uses by default; flash / memory-efficient kernels on GPU) and Transformer Engine's
``TEDotProductAttention`` when installed.

On a GPU the shapes are LLaMA-7B's (hidden 4096, 32 heads of 128, sequence 4096). Without a
GPU it says so and runs a reduced CPU version. Each row gives the median time of
``--iters`` forward+backward passes after ``--warmup`` and the forward's relative error
against an fp64 computation on the same bf16 input. All rows come from the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import socket
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"cpu: {cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); gpu: {gpu}; "
        f"torch {torch.__version__}; python {platform.python_version()}"
    )


def time_fwd_bwd(candidates, grad, warmup, iters) -> dict[str, float]:
    """Median seconds of ``fn(*inputs).backward(grad)`` per candidate ``name -> (fn, inputs)``.

    Candidates take turns within each iteration, so load from other processes on a shared
    machine affects them alike; the GPU is synchronised around each pass.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = {name: [] for name in candidates}
    for i in range(warmup + iters):
        for name, (fn, inputs) in candidates.items():
            for t in inputs:
                t.grad = None
            sync()
            start = time.perf_counter()
            fn(*inputs).backward(grad)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def bench_norms(device, s, b, h, warmup, iters) -> list[tuple[str, float, float]]:
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_ct.model.rmsnorm import available_norm_impls, build_rmsnorm

    config = TransformerConfig(
        num_layers=1, hidden_size=h, num_attention_heads=32, normalization="RMSNorm", bf16=True
    )
    x = (torch.randn(s, b, h, device=device) * 30).bfloat16().requires_grad_()  # [s, b, h]
    grad = torch.randn(s, b, h, device=device).bfloat16()
    weight = 1 + 0.2 * torch.randn(h, device=device)
    x64 = x.detach().double()
    ref = weight.bfloat16().double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)

    norms = {"megatron-core WrappedTorchNorm (baseline)": WrappedTorchNorm(config, h, eps=1e-5)}
    for impl in available_norm_impls():
        norms[f"megatron_ct {impl}"] = build_rmsnorm(config, h, eps=1e-5, impl=impl)
    for norm in norms.values():
        norm.to(device=device, dtype=torch.bfloat16)  # as Float16Module would
        with torch.no_grad():
            norm.weight.copy_(weight)
    seconds = time_fwd_bwd({name: (norm, [x]) for name, norm in norms.items()}, grad, warmup, iters)
    with torch.no_grad():
        return [(name, seconds[name], rel_err(norm(x), ref)) for name, norm in norms.items()]


def init_single_process_mcore():
    """megatron-core parallel state on a world-size-1 gloo group (local attention needs it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if not torch.cuda.is_available():
        from megatron_ct.parallel.device import activate_cpu_device_layer

        activate_cpu_device_layer()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def attention_backends(n, d):
    """name -> fn(q, k, v) with q, k, v: [s, b, n, d] and output [s, b, n * d]."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    config = TransformerConfig(
        num_layers=1,
        hidden_size=n * d,
        num_attention_heads=n,
        bf16=True,
        params_dtype=torch.bfloat16,
        attention_softmax_in_fp32=True,
        attention_dropout=0.0,
    )
    local = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    backends = {
        "megatron-core DotProductAttention (local, fp32 softmax)": lambda q, k, v: local(q, k, v, None)
    }

    def sdpa(q, k, v):
        s, b = q.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)

    backends["torch SDPA (HF default)"] = sdpa
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention

        if HAVE_TE and torch.cuda.is_available():
            te = TEDotProductAttention(config, 1, AttnMaskType.causal, "self")
            backends["Transformer Engine TEDotProductAttention"] = lambda q, k, v: te(q, k, v, None)
    except (ImportError, OSError, RuntimeError) as e:
        print(f"Transformer Engine attention unavailable: {e}")
    return backends


def bench_attention(device, s, b, n, d, warmup, iters) -> list[tuple[str, float, float]]:
    q, k, v = (torch.randn(s, b, n, d, device=device).bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(s, b, n * d, device=device).bfloat16()
    # fp64 reference on the same bf16 inputs: [b, n, s, s] scores.
    scores = torch.einsum("sbnd,tbnd->bnst", q.double(), k.double()) / math.sqrt(d)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    ref = torch.einsum("bnst,tbnd->sbnd", probs, v.double()).reshape(s, b, n * d)
    del scores, probs
    backends = attention_backends(n, d)
    seconds = time_fwd_bwd({name: (fn, [q, k, v]) for name, fn in backends.items()}, grad, warmup, iters)
    with torch.no_grad():
        return [(name, seconds[name], rel_err(fn(q, k, v), ref)) for name, fn in backends.items()]


def print_table(title, rows) -> None:
    base = rows[0][1]
    print(f"\n{title}")
    print(f"  {'implementation':<58} {'fwd+bwd ms':>11} {'vs first':>9} {'fwd rel err':>12}")
    for name, seconds, err in rows:
        print(f"  {name:<58} {seconds * 1e3:>11.3f} {seconds / base:>8.2f}x {err:>12.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cpu", action="store_true", help="force the reduced CPU run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # megatron-core's import-time notes about TE / apex

    gpu = torch.cuda.is_available() and not args.cpu
    device = "cuda" if gpu else "cpu"
    if gpu:
        norm_shape, attn_shape = (4096, 2, 4096), (4096, 1, 32, 128)  # LLaMA-7B widths
    else:
        print("no GPU: CPU timing at reduced size")
        norm_shape, attn_shape = (512, 2, 4096), (512, 1, 8, 128)
    print(machine())
    torch.manual_seed(0)
    from megatron_ct.model.rmsnorm import describe_norm_impl

    print(describe_norm_impl())
    s, b, h = norm_shape
    print_table(
        f"RMSNorm bf16, x [s={s}, b={b}, h={h}]", bench_norms(device, s, b, h, args.warmup, args.iters)
    )
    init_single_process_mcore()
    s, b, n, d = attn_shape
    print_table(
        f"causal attention bf16, q/k/v [s={s}, b={b}, heads={n}, head_dim={d}]",
        bench_attention(device, s, b, n, d, args.warmup, args.iters),
    )


if __name__ == "__main__":
    main()
