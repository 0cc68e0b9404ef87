"""Two faster ways through an `nn.Linear` on a CPU, each swapped into the layer in place (`swap`).

**`Fp32Linear`: bf16 and fp16 multiplied in fp32 (training).** On some CPUs PyTorch's bf16 and fp16
matmuls run at about half the rate of its fp32 ones (140-160 against 260-280 GFLOP/s on 2 cores of
an Intel Xeon without AMX), on others at 4x it (an AMD Zen 4 with avx512_bf16): `lmforge.kernels.measure`
races the two on each machine. Where fp32 wins, the layer multiplies bf16 (or fp16) inputs and
weights in fp32: the products of two
bf16 numbers are exact in fp32 and the sums are fp32, which is the arithmetic of a bf16 matmul with
fp32 accumulation; the result is rounded back to the input's dtype. Only the order of the sums
differs. Weights, activations and what the backward pass keeps stay in bf16; converting costs one
pass over the operands, which pays from about 64 rows on (below, the layer is a plain nn.Linear).

**`PackedLinear`: weights packed once per generate call.** Each generation step multiplies a few
rows (one per sequence) by every weight. Intel MKL's sgemm then repacks the whole weight into its
blocked layout on every call, which for a few rows costs more than the multiply. Packing each fp32
weight once (`torch.ops.mkl._mkl_reorder_linear_weight`, what `torch.compile`'s CPU freezing does)
and multiplying with `torch.ops.mkl._mkl_linear` gives bit-identical results and ~1.45x faster
steps at batch 8 (GPT-2 124M shape, `bench/generate.py`) on an Intel Xeon, but 1.4x slower ones on
an AMD Zen 4: `lmforge.kernels.measure` races plain and packed weights at 1 and 8 rows on each
machine. bf16 weights are packed for
oneDNN (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`, the same numbers up to
bf16 rounding), which read them ~1.3x faster than PyTorch's own bf16 kernel even at one row (Xeon). A
packed copy costs as much memory as its weight and is only valid while the weight does not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REDUCED = (torch.bfloat16, torch.float16)
FP32_MIN_ROWS = 64  # fewer rows than this: converting the weight to fp32 costs more than it saves

FP32_WHY = ("bf16/fp16 weights on a CPU where PyTorch's fp32 matmuls were measured faster: "
            f"multiplied in fp32 (exact products, fp32 sums) and rounded back, from {FP32_MIN_ROWS} rows on")
PACKED_WHY = {
    "mkl": "{dtype} weights, {rows} rows a step: packed once for MKL's sgemm, measured faster than repacking the "
           "whole weight at every few-row multiply (the same numbers)",
    "onednn": "{dtype} weights, {rows} rows a step: packed once for oneDNN, measured faster than PyTorch's "
              "own kernel (the same numbers up to rounding)",
}


class LinearInFp32(torch.autograd.Function):
    """x @ weight.T + bias for reduced-precision x and weight, multiplied and summed in fp32 and
    rounded to x's dtype; the gradients likewise. Keeps x and weight as they are (bf16)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.float()).to(x.dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (rows.T @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


class Fp32Linear(nn.Linear):
    """An nn.Linear whose bf16/fp16 products of many rows are computed in fp32 (module docstring)."""

    kernel = "fp32_linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype in REDUCED and self.weight.dtype == x.dtype and x.device.type == "cpu"
                and x.numel() >= FP32_MIN_ROWS * x.shape[-1]):
            return LinearInFp32.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class PackedLinear(nn.Linear):
    """An nn.Linear that multiplies through `packed_weight`, made by `pack` (module docstring)."""

    kernel = "packed"
    packed_weight: torch.Tensor
    packing: str  # "mkl" or "onednn"
    packed_rows: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packing == "mkl":
            return torch.ops.mkl._mkl_linear(x, self.packed_weight, self.weight, self.bias, self.packed_rows)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


@torch.no_grad()
def pack(weight: torch.Tensor, rows: int, packing: str) -> torch.Tensor:
    """The packed copy of `weight` for `rows` rows a step."""
    if packing == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
