"""Gradient clipping (megatron_ct/training/optimizer.py:clip_grads_): the gradients megatron-core's
``clip_grad_by_total_norm_fp32`` leaves, bit for bit, in one in-place foreach operation."""

from types import SimpleNamespace

import pytest
import torch

from megatron_ct.training.optimizer import clip_grads_


def fake_optimizer(params, clip_grad):
    """The two things the clip reads of a megatron-core optimizer."""
    return SimpleNamespace(config=SimpleNamespace(clip_grad=clip_grad), get_parameters=lambda: params)


def params_with_grads(seed: int):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(n, 16)) for n in (3, 64, 1)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 5
    params.append(torch.nn.Parameter(torch.zeros(4)))  # no gradient (frozen): skipped
    return params


@pytest.mark.parametrize("clip_grad,total_norm", [(1.0, 37.3), (1.0, 0.5), (0.0, 37.3)])
def test_clip_equals_megatron_cores(clip_grad, total_norm):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from megatron_ct.parallel.device import activate_cpu_device_layer, deactivate_cpu_device_layer

    ours, theirs = params_with_grads(0), params_with_grads(0)
    before = [p.grad.clone() for p in ours if p.grad is not None]
    clip_grads_(fake_optimizer(ours, clip_grad), total_norm)
    if clip_grad > 0:
        activate_cpu_device_layer()  # megatron-core checks for 'torch.cuda.FloatTensor' gradients
        try:
            clip_grad_by_total_norm_fp32(theirs, max_norm=clip_grad, total_norm=total_norm)
        finally:
            deactivate_cpu_device_layer()
    after = [p.grad for p in ours if p.grad is not None]
    for a, b in zip(after, [p.grad for p in theirs if p.grad is not None], strict=True):
        assert torch.equal(a, b)
    changed = any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert changed == (clip_grad > 0 and clip_grad / total_norm < 1)
    assert ours[-1].grad is None


def test_clip_walks_every_chained_optimizer():
    first, second = params_with_grads(1), params_with_grads(2)
    expected = [p.grad * (1.0 / (10.0 + 1e-6)) for p in first + second if p.grad is not None]
    chained = SimpleNamespace(chained_optimizers=[fake_optimizer(first, 1.0), fake_optimizer(second, 1.0)])
    clip_grads_(chained, 10.0)
    for got, want in zip([p.grad for p in first + second if p.grad is not None], expected, strict=True):
        assert torch.equal(got, want)
