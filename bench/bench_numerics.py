#!/usr/bin/env python
"""Forward+backward time and accuracy of RMSNorm, attention and SwiGLU implementations, in bf16.

RMSNorm: megatron-core's own PyTorch norm (``WrappedTorchNorm`` = ``torch.nn.RMSNorm``, the
baseline), our FP32-statistics fallback, its torch.compile'd version (GPU with Triton), and
Transformer Engine / apex when installed.
Attention: megatron-core's local ``DotProductAttention`` (softmax in fp32), megatron-ct's
core-attention modules (megatron_ct/model/attention.py: SDPA, FlexAttention) causal and with
packed documents (segment ids; FlexAttention's block mask skips other documents' tiles), and
Transformer Engine's ``TEDotProductAttention`` when installed.
SwiGLU: ``silu(gate) * up`` eager vs megatron-core's fused (torch.compile'd) ``bias_swiglu_impl``,
which GPU runs use.

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

    config = TransformerConfig(num_layers=1, hidden_size=h, num_attention_heads=32, normalization="RMSNorm", bf16=True)
    x = (torch.randn(s, b, h, device=device) * 30).bfloat16().requires_grad_()  # [s, b, h]
    grad = torch.randn(s, b, h, device=device).bfloat16()
    weight = 1 + 0.2 * torch.randn(h, device=device)
    x64 = x.detach().double()
    ref = weight.bfloat16().double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)

    from megatron_ct.model.rmsnorm import TORCH_COMPILE, TORCH_FP32_STATS

    norms = {"megatron-core WrappedTorchNorm (baseline)": WrappedTorchNorm(config, h, eps=1e-5)}
    impls = list(available_norm_impls())
    if device == "cuda" and TORCH_COMPILE not in impls:
        print("compiled RMSNorm not offered here (no Triton or C compiler): not measured")
    for impl in impls + ([TORCH_FP32_STATS] if TORCH_FP32_STATS not in impls else []):
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

    from megatron_ct.parallel.launch import tcp_init_method

    if not torch.cuda.is_available():
        from megatron_ct.parallel.device import activate_cpu_device_layer

        activate_cpu_device_layer()
    dist.init_process_group("gloo", init_method=tcp_init_method(), rank=0, world_size=1)
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
    from megatron_ct.model.attention import FlexCoreAttention, SDPAttention

    local = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    backends = {"megatron-core DotProductAttention (local, fp32 softmax)": lambda q, k, v: local(q, k, v, None)}
    sdpa = SDPAttention(config, 1, AttnMaskType.causal, "self")
    backends["megatron_ct sdpa (torch SDPA)"] = lambda q, k, v: sdpa(q, k, v, None)
    if torch.cuda.is_available():  # FlexAttention has no backward on CPU
        flex = FlexCoreAttention(config, 1, AttnMaskType.causal, "self")
        backends["megatron_ct flex (FlexAttention, causal block mask)"] = lambda q, k, v: flex(q, k, v, None)
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


def bench_documents(device, s, b, n, d, warmup, iters) -> list[tuple[str, float, float]]:
    """Packed documents (~500-token documents in one sequence): local's dense mask vs flex's block mask."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ct.model.attention import FlexCoreAttention, LocalAttention, SDPAttention, document_mask

    config = TransformerConfig(
        num_layers=1, hidden_size=n * d, num_attention_heads=n, bf16=True, params_dtype=torch.bfloat16,
        attention_softmax_in_fp32=True, attention_dropout=0.0, masked_softmax_fusion=False,
    )  # fmt: skip
    seg = (torch.arange(s, device=device) // 500).expand(b, s).contiguous()  # [b, s] segment ids
    q, k, v = (torch.randn(s, b, n, d, device=device).bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(s, b, n * d, device=device).bfloat16()
    allowed = ~document_mask(seg)[:, 0]  # [b, s, s]
    scores = torch.einsum("sbnd,tbnd->bnst", q.double(), k.double()) / math.sqrt(d)
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    ref = torch.einsum("bnst,tbnd->sbnd", probs, v.double()).reshape(s, b, n * d)
    del scores, probs
    causal = AttnMaskType.causal
    local, sdpa = LocalAttention(config, 1, causal, "self"), SDPAttention(config, 1, causal, "self")
    dense = document_mask(seg)
    mods = {
        "megatron-core DotProductAttention, dense [b,1,s,s] mask": lambda q, k, v: local(q, k, v, dense),
        "megatron_ct sdpa, dense mask": lambda q, k, v: sdpa(q, k, v, dense),
    }
    if device == "cuda":
        flex = FlexCoreAttention(config, 1, causal, "self")
        mods["megatron_ct flex, block mask from segment ids"] = lambda q, k, v: flex(q, k, v, seg)
    seconds = time_fwd_bwd({name: (fn, [q, k, v]) for name, fn in mods.items()}, grad, warmup, iters)
    with torch.no_grad():
        return [(name, seconds[name], rel_err(fn(q, k, v), ref)) for name, fn in mods.items()]


def bench_swiglu(device, s, b, f, warmup, iters) -> list[tuple[str, float, float]]:
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    y = (torch.randn(s, b, 2 * f, device=device) * 3).bfloat16().requires_grad_()  # [s, b, 2 * ffn]
    grad = torch.randn(s, b, f, device=device).bfloat16()
    y64 = y.detach().double()
    ref = torch.nn.functional.silu(y64[..., :f]) * y64[..., f:]

    def eager(t):
        gate, up = torch.chunk(t, 2, -1)
        return torch.nn.functional.silu(gate) * up

    mods = {"eager silu(gate) * up": eager, "megatron-core fused bias_swiglu_impl": lambda t: bias_swiglu_impl(t, None)}
    seconds = time_fwd_bwd({name: (fn, [y]) for name, fn in mods.items()}, grad, warmup, iters)
    with torch.no_grad():
        return [(name, seconds[name], rel_err(fn(y), ref)) for name, fn in mods.items()]


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
    parser.add_argument("--json", help="also write the tables to this JSON file")
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
    tables = {}

    def table(title, rows):
        print_table(title, rows)
        tables[title] = [{"impl": name, "seconds": sec, "rel_err": err} for name, sec, err in rows]

    s, b, h = norm_shape
    table(f"RMSNorm bf16, x [s={s}, b={b}, h={h}]", bench_norms(device, s, b, h, args.warmup, args.iters))
    init_single_process_mcore()
    s, b, n, d = attn_shape
    table(
        f"causal attention bf16, q/k/v [s={s}, b={b}, heads={n}, head_dim={d}]",
        bench_attention(device, s, b, n, d, args.warmup, args.iters),
    )
    table(
        f"packed documents (500 tokens each) bf16, q/k/v [s={s}, b={b}, heads={n}, head_dim={d}]",
        bench_documents(device, s, b, n, d, args.warmup, args.iters),
    )
    s, b, h = norm_shape
    ffn = 11008 if gpu else 1024
    table(f"SwiGLU bf16, [s={s}, b={b}, 2 x ffn={ffn}]", bench_swiglu(device, s, b, ffn, args.warmup, args.iters))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "tables": tables}, f, indent=1)


if __name__ == "__main__":
    main()
