"""How lmforge multiplies by a weight matrix: `Linear`, and the two CPU routes it takes.

    layer = Linear(d_in, d_out)              # an nn.Linear: same parameters, same state dict
    with packed_weights(model, rows=8):      # what generate_ids and beam search do around their loops
        logits = model(ids, cache=cache, last_only=True)
    y = linear(x, weight, bias)              # F.linear, through the packed copy of `weight` while one exists

**Reduced precision through fp32 FMAs.** On a CPU without AMX tiles (AVX-512 at best), PyTorch's
bf16 and fp16 matmuls run at about half the rate of its fp32 ones (measured 140-160 against 260-280
GFLOP/s on 2 cores, `bench/train_throughput.py` reports both peaks). There `Linear` multiplies bf16
or fp16 inputs and weights in fp32 (`prefers_fp32`): the products of two bf16 (or fp16) numbers are
exact in fp32 and the sums are fp32, which is the arithmetic of a bf16 matmul with fp32
accumulation, and the result is rounded back to the input's dtype. Only the order of the sums
differs. Weights, activations and what the backward pass keeps stay in bf16; converting costs one
pass over the operands, which pays from about 64 rows on (below, the weight's conversion dominates).

**Packed weights while generating.** Each generation step multiplies a few rows (one per sequence)
by every weight matrix. Intel MKL's sgemm then repacks the whole weight into its blocked layout on
every call, which for a few rows costs more than the multiply. Packing each fp32 weight once per
generate call (`torch.ops.mkl._mkl_reorder_linear_weight`, what `torch.compile`'s CPU freezing
does) and multiplying with `torch.ops.mkl._mkl_linear` gives bit-identical results and ~1.45x
faster steps at batch 8 (GPT-2 124M shape, `bench/generate.py`); at one row an fp32 step is bound
by reading the weights either way (no gain measured), so fp32 is packed from two rows on. bf16
weights are packed for oneDNN (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`,
the same numbers up to bf16 rounding), which reads them ~1.3x faster than PyTorch's own bf16
kernel even at one row. The packed copies live only inside the `with` block and cost as much
memory as the weights; they are not made where they would take more than half the memory still
available.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _cpu_has_amx() -> bool:
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_supported and is_supported())


_CPU_HAS_AMX = _cpu_has_amx()
FP32_MIN_ROWS = 64  # fewer rows than this: converting the weight to fp32 costs more than it saves


def prefers_fp32(x: torch.Tensor) -> bool:
    """True for a bf16 or fp16 tensor on a CPU without AMX tiles: there PyTorch's fp32 matmul and
    attention kernels are ~2x faster than its reduced-precision ones, so `Linear`, the attention
    and the loss head compute in fp32 and hand back results in the tensor's dtype. GPUs and CPUs
    with AMX keep the reduced-precision kernels."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not _CPU_HAS_AMX


class _LinearInFp32(torch.autograd.Function):
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


_packed: dict[int, tuple[torch.Tensor, torch.Tensor, int, str]] = {}  # id(weight) -> (weight, packed, rows, kind)


def _mkl_packing_available() -> bool:
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
    except (AttributeError, RuntimeError):
        return False


def _onednn_packing_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())  # the CPU has bf16 instructions (AVX-512 on)
    except (AttributeError, RuntimeError):
        return False


MKL_PACKING = _mkl_packing_available()  # fp32 weights, through MKL's sgemm
ONEDNN_PACKING = _onednn_packing_available()  # bf16 weights, through oneDNN


def packing_for(weight: torch.Tensor, rows: int) -> str | None:
    """How a CPU weight is packed for `rows` rows ("mkl" for fp32 from 2 rows on, "onednn" for bf16),
    or None where packing would not pay or cannot be done."""
    if weight.device.type != "cpu":
        return None
    if weight.dtype == torch.float32 and MKL_PACKING and rows >= 2:
        return "mkl"
    if weight.dtype == torch.bfloat16 and ONEDNN_PACKING:
        return "onednn"
    return None


def _pack(weight: torch.Tensor, rows: int, kind: str) -> torch.Tensor:
    if kind == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _packed_copy(weight: torch.Tensor) -> tuple[torch.Tensor, int, str] | None:
    """The packed copy of `weight`, the rows it was packed for and how, while one exists."""
    entry = _packed.get(id(weight))
    return entry[1:] if entry is not None and entry[0] is weight else None


def is_packed(weight: torch.Tensor) -> bool:
    return _packed_copy(weight) is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, like `F.linear`: through the packed copy of `weight` inside `packed_weights`,
    in fp32 for many rows of bf16/fp16 on a CPU without AMX (`prefers_fp32`)."""
    packed = _packed_copy(weight)
    if packed is not None:
        packed_weight, rows, kind = packed
        if kind == "mkl":
            return torch.ops.mkl._mkl_linear(x, packed_weight, weight, bias, rows)
        return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")
    if prefers_fp32(x) and weight.dtype == x.dtype and x.numel() >= FP32_MIN_ROWS * x.shape[-1]:
        return _LinearInFp32.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (the same parameters and state dict) that multiplies through `linear`. Every linear
    layer of lmforge's models is one; peft's LoRA wraps it like any nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _weights_to_pack(model: nn.Module) -> list[torch.Tensor]:
    """The weights of the model's `Linear` layers and its head (in the head's dtype), each once,
    that are not packed yet."""
    dtype = model.head_weight.dtype
    weights = [m.weight for m in model.modules() if isinstance(m, Linear) and m.weight.dtype == dtype]
    return list({id(w): w for w in [*weights, model.head_weight] if id(w) not in _packed}.values())


def available_memory() -> int:
    """Bytes of memory the system can still give (Linux's MemAvailable); unbounded where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2**63


@contextmanager
def packed_weights(model: nn.Module, rows: int) -> Iterator[None]:
    """Inside the block, the model's `Linear` layers and output head multiply through packed weights.

    Does nothing where it would not pay (`packing_for`) or where the copies would take more than
    half the memory still available. Weights already packed (by an enclosing `packed_weights`) are
    left to it. The packed copies are made from the weights as they are on entry: the weights must
    not change inside the block (generation does not change them).
    """
    kind = packing_for(model.head_weight, rows)
    mine = _weights_to_pack(model) if kind is not None else []
    if not mine or 2 * sum(w.nbytes for w in mine) > available_memory():
        yield
        return
    with torch.no_grad():
        for w in mine:
            _packed[id(w)] = (w, _pack(w.detach(), rows, kind), rows, kind)
    try:
        yield
    finally:
        for w in mine:
            _packed.pop(id(w), None)
