"""RMSNorm and LayerNorm that keep only their input (and 1 or 2 numbers a row) for the backward pass.

    norm.rms_norm = lean_rms_norm(norm.rms_norm)         # what `kernels.apply(model, for_="train")` does
    norm.layer_norm = lean_layer_norm(norm.layer_norm)

lmforge's norms expose their function as a hook: `RMSNorm.rms_norm` ((x, weight, eps) -> x / rms(x) *
weight, in fp32, in x's dtype) and `LayerNorm.layer_norm` ((x, weight, bias, eps) -> `F.layer_norm`
on the last dimension). Autograd's RMSNorm keeps x / rms(x) besides x where the weight trains, and
an fp32 copy of a bf16/fp16 x; the lean norms keep x, the per-row rstd (LayerNorm: and mean) and
the weight, and make x / rms(x) again in the backward pass. LayerNorm's forward and backward are
the very kernels autograd runs (`native_layer_norm` and its backward): the same numbers. RMSNorm's
backward is its gradient formula in fp32, equal to autograd's to fp32 rounding.

Their outputs are also registered with `remake`: the layer that reads a norm's output (a LoRA
adapter, the weight gradient of the next linear layer) keeps the recipe instead of the output,
and the backward pass makes it again from the kept x and rstd. On SmolLM2-135M (LoRA, fp32, batch
8 x 255) that is 2 tensors of 8 x 255 x 576 a layer, 30 layers: about 280 MB. Measured there with
`lean_swiglu`'s remade product (Trainer steps, glibc malloc, 3 processes each): peak RSS 4,051-4,208 MB
against 4,876-4,908 MB with `lean_swiglu` alone; the step time the same within noise (in-process
A/B on a loaded 2-core machine: 0.1-1.4% slower, median of paired rounds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.kernels import remake

WHY = ("RMSNorm/LayerNorm keep only their input and per-row statistics for the backward pass, and the layers "
       "that read their output keep it as a recipe: it is made again there (the same numbers)")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x) * weight in fp32, in x's dtype, and rstd = 1 / rms(x): F.rms_norm's ops in its order."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    return (xf * rstd).mul_(weight.float()).to(x.dtype), rstd


def _rms_norm_output(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm(x, weight, eps)[0]


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        normed = x.float() * rstd  # x / rms(x)
        g = grad.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = g * weight.float()
            dot = (g * normed).mean(-1, keepdim=True)
            grad_x = normed.mul_(dot).neg_().add_(g).mul_(rstd).to(x.dtype)  # rstd * (g - normed * mean(g normed))
        return grad_x, grad_w, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad, x, (x.shape[-1],), mean, rstd, weight, bias, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_w, grad_b, None


def _layer_norm_output(x, weight, bias, eps):
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)[0]


def lean_rms_norm(inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The same function as `inner` (lmforge's `rms_norm`), keeping only x, rstd and the weight."""

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return remake.register(_RMSNorm.apply(x, weight, eps), _rms_norm_output, x, weight, eps)

    rms_norm.kernel, rms_norm.inner = "lean_norm", inner
    return rms_norm


def lean_layer_norm(inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The same function as `inner` (lmforge's `layer_norm`), keeping only x, mean, rstd, weight and bias."""

    def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
        return remake.register(_LayerNorm.apply(x, weight, bias, eps), _layer_norm_output, x, weight, bias, eps)

    layer_norm.kernel, layer_norm.inner = "lean_norm", inner
    return layer_norm
