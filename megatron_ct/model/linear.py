"""megatron-core's linear layers on one TP rank, without the per-call work that TP > 1 needs.

On one tensor-parallel rank, megatron-core's ``ColumnParallelLinear`` and ``RowParallelLinear``
still run every GEMM through three Python autograd functions: an identity "copy to the TP
region" (column) or "reduce from the TP region" (row), and
``LinearWithGradAccumulationAndAsyncCommunication``, whose backward checks sequence parallelism,
deferred weight gradients, FSDP and TE at every call and builds its placeholder weight gradient
through ``torch.cuda.current_device()``. A LLaMA layer has four such GEMMs, plus the output
layer; on a small CPU model that Python is a measurable part of the step (bench/README.md).

:class:`_LinearIntoMainGrad` computes the same with one function: the forward GEMM
(``input @ weight.T``, then ``+ bias``); in the backward the input gradient ``grad @ weight``,
the weight gradient added to ``weight.main_grad`` by the kernel megatron-core calls
(``fused_weight_gradient_mlp_cuda``: apex's, or the CPU one of
:mod:`megatron_ct.parallel.device`), and the bias gradient ``grad.sum(0)`` over the flattened
tokens, as megatron-core computes them. Losses and gradients are bit-identical (tested).

Installed by :func:`lean_linears` only where that is exact: one TP rank, no sequence
parallelism or expert communication, weight gradients accumulated into the DDP buffers
(``gradient_accumulation_fusion``), no deferred embedding weight gradients. The forward checks
what can change after building (a frozen weight, a weight without a DDP buffer, CPU offloading)
and otherwise runs megatron-core's forward.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import layers
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


class _LinearIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.main_grad = weight.main_grad  # not saved for backward: megatron-core does the same
        ctx.use_bias = bias is not None
        out = torch.matmul(x, weight.t())
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        main_grad = ctx.main_grad
        weight.main_grad = main_grad
        grad_input = grad.matmul(weight)
        g = grad.contiguous()
        x = x.contiguous()
        if g.dim() == 3:
            g = g.view(-1, g.shape[-1])
            x = x.view(-1, x.shape[-1])
        kernel = layers.fused_weight_gradient_mlp_cuda
        if main_grad.dtype == torch.float32:
            kernel.wgrad_gemm_accum_fp32(x, g, main_grad)
        else:
            kernel.wgrad_gemm_accum_fp16(x, g, main_grad)
        # DDP's hook skips its add when this is set; a gradient must still reach the weight so
        # that the hook runs (bucket bookkeeping). Its values are never read, unless asked zeroed.
        if getattr(weight, "zero_out_wgrad", False):
            grad_weight = torch.zeros(main_grad.shape, dtype=x.dtype, device=x.device)
        else:
            grad_weight = torch.empty(main_grad.shape, dtype=x.dtype, device=x.device)
        weight.grad_added_to_main_grad = True
        grad_bias = g.sum(dim=0) if ctx.use_bias else None
        return grad_input, grad_weight, grad_bias


def _lean_applies(module, weight: torch.Tensor) -> bool:
    """What can change after building: the weight trains into a DDP buffer, no CPU offloading."""
    return (
        module.gradient_accumulation_fusion
        and weight.requires_grad
        and hasattr(weight, "main_grad")
        and hasattr(weight, "grad_added_to_main_grad")
        and getattr(module.config, "_cpu_offloading_context", None) is None
    )


class LeanColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` on one TP rank through :class:`_LinearIntoMainGrad`."""

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        # A weight passed in: the tied output layer's (the embedding's); gathering is a no-op here.
        w = self.weight if weight is None else weight
        if w is None or w.shape != (self.output_size_per_partition, self.input_size) or not _lean_applies(self, w):
            return super().forward(input_, weight, runtime_gather_output)  # megatron-core's checks and errors
        bias = self.bias if not self.skip_bias_add else None
        output = _LinearIntoMainGrad.apply(input_, w, bias)
        return output, (self.bias if self.skip_bias_add else None)


class LeanRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` on one TP rank through :class:`_LinearIntoMainGrad`."""

    def forward(self, input_: torch.Tensor):
        if not _lean_applies(self, self.weight):
            return super().forward(input_)
        output = _LinearIntoMainGrad.apply(input_, self.weight, None)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None


def lean_linears(model: torch.nn.Module) -> int:
    """Give a built model's TP-1 linear layers the lean path (see the module docstring); returns
    how many layers it applies to. Only exact types are changed (a subclass, e.g. Transformer
    Engine's, keeps its own forward), and only where nothing per call needs TP: one TP rank, no
    sequence parallelism or expert communication, gradients accumulated into DDP buffers, no
    deferred embedding weight gradients."""
    n = 0
    for module in model.modules():
        cls = type(module)
        if cls not in (ColumnParallelLinear, RowParallelLinear):
            continue
        config = module.config
        if (
            module.tp_group is None
            or module.tp_group.size() != 1
            or module.sequence_parallel
            or module.explicit_expert_comm
            or not module.gradient_accumulation_fusion
            or config.defer_embedding_wgrad_compute
        ):
            continue
        if cls is ColumnParallelLinear and (module.gather_output or module.disable_grad_reduce):
            continue
        if cls is RowParallelLinear and not module.input_is_parallel:
            continue
        module.__class__ = LeanColumnParallelLinear if cls is ColumnParallelLinear else LeanRowParallelLinear
        n += 1
    return n
