"""SwiGLU that keeps only its input for the backward pass (any device).

    mlp.swiglu = lean_swiglu(mlp.swiglu)     # what `kernels.apply(model, for_="train")` does

A model's SwiGLU MLP exposes its activation as a hook (`swiglu`: h = [gate, up] (..., 2F) ->
silu(gate) * up (..., F)). Autograd's own silu and multiply keep silu(gate) besides h, as large as
the output: F values per token and layer (on SmolLM2-135M, LoRA at batch 8 x 255 in fp32, about
375 MB). `lean_swiglu` keeps h alone and makes silu(gate) again in the backward pass (one sigmoid),
with the same kernels, so the gradients are the very same numbers. Its output is registered with
`remake`: the layer that reads it (`down`'s LoRA adapter or weight gradient) keeps the recipe, and
the backward pass makes the product again from h (F values per token and layer: about 375 MB more).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmforge.kernels import remake

WHY = ("SwiGLU keeps only its input for the backward pass and makes silu(gate), and for the layer that reads it "
       "the product, again there (the same numbers)")


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up for h = [gate, up] (..., 2 * F), keeping only h for the backward pass."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return _swiglu(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)  # what F.silu's backward runs
        return grad_h


def lean_swiglu(inner: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same function as `inner` (a plain SwiGLU), keeping only its input for the backward pass."""

    def swiglu(h: torch.Tensor) -> torch.Tensor:
        return remake.register(_SwiGLU.apply(h), _swiglu, h)

    swiglu.kernel, swiglu.inner = "lean_swiglu", inner
    return swiglu
