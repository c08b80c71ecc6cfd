"""RMSNorm numerics (FP32 statistics, HF parity) and sequence-parallel gradients at TP=2."""

import pytest
import torch
import torch.multiprocessing as mp
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_ct.model.rmsnorm import (
    TORCH_FP32_STATS,
    FP32StatsRMSNorm,
    RMSNorm,
    available_norm_impls,
    build_rmsnorm,
    describe_norm_impl,
)

EPS = 1e-5
BF16_U = 2.0**-8  # unit roundoff of bf16 (8 significant bits)


def norm_config(hidden=256, dtype=torch.float32, **kw):
    return TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=4,
        normalization="RMSNorm",
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **kw,
    )


def reference(x, weight):
    """Exact RMSNorm in float64: weight * x / sqrt(mean(x^2) + eps)."""
    x64 = x.double()
    return weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)


def naive(x, weight):
    """The same formula evaluated in the input dtype throughout."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def activations(dtype, hidden=1024, scale=30.0):
    """[s, b, h] hidden states with a few LLM-style massive-activation channels."""
    x = torch.randn(64, 2, hidden) * scale
    x[..., :4] *= 40
    return x.to(dtype)


def norm_with_weight(dtype, hidden):
    norm = FP32StatsRMSNorm(norm_config(hidden, dtype), hidden, EPS)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(hidden))
    return norm


def max_rel_err(y, ref):
    return ((y.double() - ref).abs() / ref.abs()).max().item()


def within_two_roundings(y, ref):
    """HF's recipe rounds twice (normalised value to the input dtype, then the weight product):
    |y - ref| <= (2u + u^2) |ref|, plus the absolute spacing of subnormals."""
    finfo = torch.finfo(y.dtype)
    u = finfo.eps / 2
    tiny = 2 * finfo.smallest_normal * u
    return bool(((y.double() - ref).abs() <= (2 * u + u * u) * ref.abs() + tiny).all())


def test_bf16_fallback_within_bf16_rounding_naive_is_not(seeded):
    x = activations(torch.bfloat16)
    norm = norm_with_weight(torch.bfloat16, x.shape[-1])
    ref = reference(x, norm.weight)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    bad = naive(x, norm.weight)
    ours, bf16_only = max_rel_err(y, ref), max_rel_err(bad, ref)
    print(f"\nmax rel err vs fp64: fp32-stats {ours:.5f}, all-bf16 {bf16_only:.5f} (bf16 u = {BF16_U:.5f})")
    assert within_two_roundings(y, ref)
    assert not within_two_roundings(bad, ref)


def test_fp16_statistics_do_not_overflow(seeded):
    # |x| > 256 squares past fp16's max (65504): the all-fp16 variance is inf and the output 0.
    x = activations(torch.float16, scale=300.0)
    norm = norm_with_weight(torch.float16, x.shape[-1])
    ref = reference(x, norm.weight)
    bad = naive(x, norm.weight)
    assert (bad == 0).all() or not torch.isfinite(bad).all()
    assert within_two_roundings(norm(x), ref)


def test_bitwise_equal_to_transformers_llama_rmsnorm(seeded):
    # Imported here so the TP=2 worker processes, which re-import this module, skip transformers.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = activations(torch.bfloat16)
    norm = norm_with_weight(torch.bfloat16, x.shape[-1])
    hf = LlamaRMSNorm(x.shape[-1], eps=EPS).bfloat16()
    with torch.no_grad():
        hf.weight.copy_(norm.weight)
    assert torch.equal(norm(x), hf(x))


def test_spec_entry_builds_fallback_on_cpu():
    config = norm_config(sequence_parallel=False)
    norm = build_module(ModuleSpec(module=RMSNorm), config=config, hidden_size=64, eps=EPS)
    assert available_norm_impls() == (TORCH_FP32_STATS,)  # no CUDA here
    assert isinstance(norm, FP32StatsRMSNorm) and norm.eps == EPS
    assert "FP32StatsRMSNorm" in describe_norm_impl()
    with pytest.raises(ValueError, match="impl="):
        build_rmsnorm(config, 64, impl="triton")


def test_rejects_options_it_does_not_implement():
    with pytest.raises(ValueError, match="layernorm_zero_centered_gamma"):
        FP32StatsRMSNorm(norm_config(layernorm_zero_centered_gamma=True), 64)
    layernorm = norm_config()
    layernorm.normalization = "LayerNorm"
    with pytest.raises(ValueError, match="normalization="):
        build_rmsnorm(layernorm, 64)


# --- TP=2 with sequence parallelism (2 gloo processes) -------------------------------------------


def _tp2_worker(rank: int, port: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads
    from megatron.core.tensor_parallel import mappings

    from megatron_ct.parallel.device import activate_cpu_device_layer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    activate_cpu_device_layer()  # the sequence all-gather allocates on torch.cuda.current_device()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)

    # Same full batch on both ranks: bf16 activations, fp32 weight (megatron's main-param dtype).
    torch.manual_seed(0)
    s, b, h = 16, 2, 64
    x = activations(torch.bfloat16, hidden=h)[:s]  # [s, b, h]
    upstream = torch.randn(s, b, h)  # d(loss)/d(output)
    weight = 1 + 0.2 * torch.randn(h)

    def run(norm, config):
        """Forward + backward; returns output [s, b, h], input grad (this rank's part), weight grad."""
        with torch.no_grad():
            norm.weight.copy_(weight)
        if config.sequence_parallel:
            # This rank's sequence slice, as scatter_to_sequence_parallel_region would give; taken
            # directly because that op's backward all-gathers into a torch.cuda.current_device()
            # buffer, which the CPU device layer does not redirect inside autograd backward.
            x_in = x.chunk(2)[rank].clone().requires_grad_()  # [s/2, b, h]
            # The loss below is replicated, so the gathered output's grad is only split back.
            y = mappings.gather_from_sequence_parallel_region(norm(x_in), tensor_parallel_output_grad=False)
        else:
            x_in = x.clone().requires_grad_()
            y = norm(x_in)
        (y.float() * upstream).sum().backward()
        # What finalize_model_grads does for non-TP-sharded params: sum grads marked sequence_parallel.
        chunk = torch.nn.Module()
        chunk.norm, chunk.ddp_config = norm, DistributedDataParallelConfig()
        _allreduce_non_tensor_model_parallel_grads([chunk], config)
        return y.detach(), x_in.grad, norm.weight.grad

    tp1_config = norm_config(h)
    sp_config = norm_config(h, tensor_model_parallel_size=2, sequence_parallel=True)
    tp1 = run(FP32StatsRMSNorm(tp1_config, h, EPS), tp1_config)
    tp2 = run(FP32StatsRMSNorm(sp_config, h, EPS), sp_config)
    assert torch.equal(tp2[0], tp1[0]), "output differs"
    assert torch.equal(tp2[1], tp1[1].chunk(2)[rank]), "input grad differs"
    torch.testing.assert_close(tp2[2], tp1[2], rtol=1e-5, atol=1e-6, msg="weight grad differs")

    # Control: torch.nn.RMSNorm (megatron-core's WrappedTorchNorm) carries no sequence_parallel
    # mark, so its weight grad stays a per-rank partial sum.
    plain = run(torch.nn.RMSNorm(h, eps=EPS), sp_config)
    assert not torch.allclose(plain[2], tp1[2], rtol=1e-2), "unmarked weight grad was reduced"

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.slow
def test_sequence_parallel_tp2_matches_tp1(tcp_port):
    mp.spawn(_tp2_worker, args=(tcp_port,), nprocs=2, join=True)


def _compiled_or_skip():
    """torch.compile needs a C++ compiler on CPU (Triton on GPU); skip, saying why, without one."""
    from megatron_ct.model.rmsnorm import compiled_rms_norm

    fn = compiled_rms_norm()
    if fn is None:
        pytest.skip("this torch's inductor has no emulate_precision_casts: the compiled norm is not offered")
    try:
        fn(torch.ones(2, 8), torch.ones(8), EPS)
    except Exception as e:  # no compiler, or a backend that cannot build here
        pytest.skip(f"torch.compile cannot run on this machine: {type(e).__name__}: {str(e)[:200]}")
    return fn


@pytest.mark.slow  # compiling forward and backward takes ~20 s on 2 cores
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_norm_equals_eager(seeded, dtype):
    """The fused (torch.compile) RMSNorm: the eager forward bit for bit in bf16 (FP32: within a
    rounding, the mean's summation order differs), gradients within a few roundings.

    Runs wherever torch.compile can (C++ inductor on CPU, Triton on GPU); on GPU it is the norm
    picked when neither Transformer Engine nor apex is installed.
    """
    from megatron_ct.model.rmsnorm import TORCH_COMPILE

    _compiled_or_skip()
    x = activations(dtype)
    eager = norm_with_weight(dtype, x.shape[-1])
    fused = build_rmsnorm(norm_config(x.shape[-1], dtype), x.shape[-1], EPS, impl=TORCH_COMPILE)
    fused.load_state_dict(eager.state_dict())
    upstream = torch.randn_like(x)
    out, grads = {}, {}
    for name, norm in (("eager", eager), ("fused", fused)):
        xi = x.clone().requires_grad_()
        out[name] = norm(xi)
        out[name].backward(upstream)
        grads[name] = (xi.grad, norm.weight.grad)
    u = torch.finfo(dtype).eps
    if dtype == torch.bfloat16:  # the FP32 statistics' reduction order is hidden by the rounding to bf16
        assert torch.equal(out["fused"], out["eager"])
    torch.testing.assert_close(out["fused"], out["eager"], rtol=4 * u, atol=0)
    for a, e in zip(grads["fused"], grads["eager"], strict=True):
        torch.testing.assert_close(a, e, rtol=4 * u, atol=4 * u * e.abs().max().item())
    assert fused.weight.sequence_parallel is False  # same parameter attributes as the eager norm
