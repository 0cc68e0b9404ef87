"""Attention and the fused loss head in fp32 for bf16/fp16 models on a CPU without AMX tiles.

    layer.sdpa = fp32_attention(layer.sdpa)                             # what `kernels.apply` does
    model.linear_cross_entropy = fp32_cross_entropy(model.linear_cross_entropy)

The models expose these two functions as attributes (the hooks `lmforge.kernels` documents): the
attention function, with the signature of `F.scaled_dot_product_attention`, and the loss of the
output head, (h (N, d), weight (V, d), targets (N,)) -> mean cross-entropy. Where PyTorch's fp32
kernels are the fast ones (`Fp32Linear`'s reason), both run on fp32 copies of their inputs and hand
back results in the inputs' dtype; autograd rounds the gradients back through the copies. Attention
is upcast where the queries are as many as the keys (training, a prompt), not for a generation
step's few queries over a long cache (converting the cache at every step would cost more).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.kernels.linear import REDUCED

ATTENTION_WHY = ("bf16/fp16 attention on a CPU without AMX tiles: computed on fp32 copies of q, k, v "
                 "(PyTorch's fp32 attention is the faster one there), output rounded back")
LOSS_WHY = ("bf16/fp16 output head and loss on a CPU without AMX tiles: the chunked head matmuls run on fp32 "
            "copies (no conversion of every chunk of fp32 logits and their gradient)")


def fp32_attention(inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`inner` (an attention function) run in fp32 for bf16/fp16 CPU inputs with as many queries as keys."""

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
             **options) -> torch.Tensor:
        if q.dtype not in REDUCED or q.device.type != "cpu" or q.shape[-2] != k.shape[-2]:
            return inner(q, k, v, attn_mask=attn_mask, **options)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        return inner(q.float(), k.float(), v.float(), attn_mask=attn_mask, **options).to(q.dtype)

    sdpa.kernel, sdpa.inner = "fp32_attention", inner
    return sdpa


def fp32_cross_entropy(inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`inner` (a fused head + loss) run on fp32 copies of bf16/fp16 CPU hidden states and head weight."""

    def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             *args, **options) -> torch.Tensor:
        if h.dtype in REDUCED and h.device.type == "cpu":
            h, weight = h.float(), weight.float()
        return inner(h, weight, targets, *args, **options)

    linear_cross_entropy.kernel, linear_cross_entropy.inner = "fp32_loss", inner
    return linear_cross_entropy
