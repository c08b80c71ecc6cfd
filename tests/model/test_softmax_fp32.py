"""``attention_softmax_in_fp32`` in megatron-core's local attention path, on CPU, with bf16 logits.

What the numbers show (printed with ``-s``):
- forward: torch's bf16 softmax kernel already accumulates in fp32 and rounds once, so on CPU
  both settings give the same probabilities, within one bf16 rounding of the exact softmax;
  a softmax evaluated op by op in bf16 is worse;
- backward: the flag keeps the probabilities in fp32 for the softmax gradient; without it the
  gradient is computed from bf16-rounded probabilities and its error is several times larger;
- ``DotProductAttention`` honours the flag, but the logits it feeds the softmax are already
  rounded to bf16 by its ``baddbmm``; with large logits that rounding, not the softmax, is the
  main error of the local path (as in HF's eager attention; TE/flash keep scores in fp32).
"""

import math

import pytest
import torch

from megatron_ct.parallel.device import activate_cpu_device_layer, deactivate_cpu_device_layer

U = 2.0**-8  # bf16 unit roundoff


@pytest.fixture
def cpu_device_layer():
    """megatron-core's softmax builds its causal mask with device='cuda': map it to CPU."""
    activate_cpu_device_layer()
    yield
    deactivate_cpu_device_layer()


def causal_mask(s):
    return torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)  # True = masked


def exact_softmax_and_grad(logits, upstream):
    """fp64 softmax of the given (bf16) logits under a causal mask, and d(loss)/d(logits)."""
    x = logits.detach().double().requires_grad_()
    probs = torch.softmax(x.masked_fill(causal_mask(x.shape[-1]), float("-inf")), dim=-1)
    probs.backward(upstream.double())
    return probs.detach(), x.grad


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def within_one_rounding(p, ref):
    return bool(((p.double() - ref).abs() <= U * ref.abs() + 1e-30).all())


def megatron_softmax(softmax_in_fp32):
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    return FusedScaleMaskSoftmax(
        input_in_fp16=False,
        input_in_bf16=True,
        attn_mask_type=AttnMaskType.causal,
        scaled_masked_softmax_fusion=False,  # the CUDA kernel; on CPU only the torch path exists
        mask_func=attention_mask_func,
        softmax_in_fp32=softmax_in_fp32,
        scale=None,
    )


def test_fused_scale_mask_softmax_fp32_vs_bf16(cpu_device_layer, seeded):
    logits = (torch.randn(2, 4, 64, 64) * 30).bfloat16()  # [b, np, sq, sk], |x| up to ~130
    upstream = torch.randn(2, 4, 64, 64).bfloat16()  # d(loss)/d(probs)
    ref_probs, ref_grad = exact_softmax_and_grad(logits, upstream)

    results = {}
    for fp32 in (True, False):
        x = logits.clone().requires_grad_()
        probs = megatron_softmax(fp32)(x.clone(), None)  # clone: the bf16 path masks in place
        probs.backward(upstream)
        assert probs.dtype == x.grad.dtype == torch.bfloat16
        results[fp32] = (probs.detach(), x.grad)

    masked = logits.float().masked_fill(causal_mask(64), -10000.0)
    e = torch.exp(masked.bfloat16() - masked.bfloat16().amax(-1, keepdim=True))
    op_by_op_bf16 = e / e.sum(-1, keepdim=True)

    (p32, g32), (p16, g16) = results[True], results[False]
    print(
        f"\nforward max |err|: fp32 softmax {(p32.double() - ref_probs).abs().max():.2e}, "
        f"bf16 softmax {(p16.double() - ref_probs).abs().max():.2e}, "
        f"op-by-op bf16 {(op_by_op_bf16.double() - ref_probs).abs().max():.2e}"
    )
    print(f"backward rel err: fp32 softmax {rel_err(g32, ref_grad):.2e}, bf16 softmax {rel_err(g16, ref_grad):.2e}")
    assert within_one_rounding(p32, ref_probs)
    assert not within_one_rounding(op_by_op_bf16, ref_probs)
    assert torch.equal(p16, p32)  # torch's bf16 softmax kernel accumulates in fp32 (CPU)
    assert rel_err(g32, ref_grad) <= U
    assert rel_err(g16, ref_grad) > 2 * rel_err(g32, ref_grad)


def record_softmax_grads(softmax):
    """Hooks that store the softmax's input logits, d(loss)/d(probs) and d(loss)/d(logits)."""
    seen = {}

    def pre_hook(module, args):
        logits = args[0]  # [b, np, sq, sk] bf16
        seen["logits"] = logits.detach().clone()
        logits.register_hook(lambda g: seen.__setitem__("d_logits", g))
        # Hand over a copy: the bf16 path masks its input in place, which would drop the hook.
        return (logits.clone(), *args[1:])

    def post_hook(module, args, out):
        out.register_hook(lambda g: seen.__setitem__("d_probs", g))

    softmax.register_forward_pre_hook(pre_hook)
    softmax.register_forward_hook(post_hook)
    return seen


def test_dot_product_attention_honours_flag(mcore_tp1, cpu_device_layer):
    from megatron.core import tensor_parallel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    # DotProductAttention forks this RNG tracker; under the CPU device layer it also seeds torch.
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    s, b, n, d = 64, 2, 4, 32
    q = (torch.randn(s, b, n, d) * 20).bfloat16()  # large logits: |q.k| / sqrt(d) up to ~80
    k, v = torch.randn(s, b, n, d).bfloat16(), torch.randn(s, b, n, d).bfloat16()
    upstream = torch.randn(s, b, n * d).bfloat16()  # d(loss)/d(context) [s, b, h]

    errors = {}
    for fp32 in (True, False):
        config = TransformerConfig(
            num_layers=1,
            hidden_size=n * d,
            num_attention_heads=n,
            bf16=True,
            params_dtype=torch.bfloat16,
            attention_softmax_in_fp32=fp32,
            attention_dropout=0.0,
        )
        attn = DotProductAttention(config, 1, AttnMaskType.causal, "self")
        assert attn.scale_mask_softmax.softmax_in_fp32 is fp32
        # The softmax's own gradients, isolated from the bf16 matmuls around it.
        seen = record_softmax_grads(attn.scale_mask_softmax)
        qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
        attn(qi, ki, vi, None).backward(upstream)
        _, ref_grad = exact_softmax_and_grad(seen["logits"], seen["d_probs"])
        errors[fp32] = rel_err(seen["d_logits"], ref_grad)

    # The logits are rounded to bf16 before the softmax: show what that costs end to end.
    def attention_fp64(round_logits):
        logits = torch.einsum("sbnd,tbnd->bnst", q.double(), k.double()) / math.sqrt(d)
        if round_logits:
            logits = logits.bfloat16().double()
        probs = torch.softmax(logits.masked_fill(causal_mask(s), float("-inf")), dim=-1)
        return torch.einsum("bnst,tbnd->sbnd", probs, v.double())

    exact = attention_fp64(round_logits=False)
    logit_rounding = rel_err(attention_fp64(round_logits=True), exact)
    print(
        f"\nsoftmax grad rel err inside DotProductAttention: fp32 {errors[True]:.2e}, "
        f"bf16 {errors[False]:.2e}; attention output rel err from bf16 logits alone: {logit_rounding:.2e}"
    )
    assert errors[True] <= U
    assert errors[False] > 1.5 * errors[True]
    assert logit_rounding > U  # larger than any single bf16 rounding: the dominant error here
