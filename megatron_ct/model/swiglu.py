"""SwiGLU, the activation of the LLaMA MLP: ``silu(gate) * up`` on the fused fc1 output.

megatron-core's unfused path (used where its compiled kernel cannot run) computes
``silu(gate) * (up + glu_linear_offset)``: with the offset 0 of every LLaMA model that is a
copy of ``up`` per layer and micro-batch for nothing, and its backward concatenates the
gradients of the two halves into a new tensor. This module computes the same values and
gradients, bit for bit (the same kernels in the same order), without either: it keeps only
its input for the backward (megatron-core's fused kernel does the same), recomputes
``silu(gate)`` there, and writes both halves of the gradient in place into one tensor.

The layer spec provides it as the MLP's ``activation_func`` module, which megatron-core uses
when the config sets ``use_te_activation_func`` (see
:func:`megatron_ct.model.llama.transformer_config`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, dim=-1)
        dx = torch.empty_like(x)
        d_gate, d_up = torch.chunk(dx, 2, dim=-1)
        # What autograd computes for silu(gate) * up: d_up = grad * silu(gate), and
        # d_gate = silu_backward(grad * up, gate).
        torch.mul(grad, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return dx


class SwiGLU(torch.nn.Module):
    """``[..., 2 * ffn / tp] -> [..., ffn / tp]``: the first half gates, the second is gated
    (the layout of megatron-core's fc1, and of the HF conversion that fills it)."""

    def __init__(self, config=None) -> None:
        super().__init__()
        offset = getattr(config, "glu_linear_offset", 0.0)
        clamp = getattr(config, "activation_func_clamp_value", None)
        if offset != 0.0 or clamp is not None:
            raise ValueError(
                f"SwiGLU: glu_linear_offset={offset}, activation_func_clamp_value={clamp}: expected 0.0 and None"
            )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        return {}  # no state: megatron-core's MLP asks every child for its sharded tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwiGLUFunction.apply(x)
