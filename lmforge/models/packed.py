"""Weights packed once for the CPU's matrix multiply while a batch generates: same results, faster steps.

    with packed_weights(model, rows=8):      # what generate_ids and beam search do around their loops
        logits = model(ids, cache=cache, last_only=True)
    y = linear(x, weight, bias)              # F.linear, through the packed copy of `weight` while one exists

Each generation step multiplies a few rows (one per sequence) by every weight matrix. Intel MKL's
sgemm then repacks the whole weight into its blocked layout on every call, which for a few rows costs
more than the multiply. Packing each fp32 weight once per generate call
(`torch.ops.mkl._mkl_reorder_linear_weight`, what `torch.compile`'s CPU freezing does) and multiplying
with `torch.ops.mkl._mkl_linear` gives bit-identical results and ~1.4x faster steps at batch 8 (GPT-2
124M shape, `bench/generate.py`). The packed copies live only inside the `with` block and cost as
much memory as the weights, so packing is done only where it pays: fp32 weights on a CPU with MKL and
at least two rows (at one row a step is bound by reading the weights either way: no gain measured).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_packed: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # id(weight) -> (weight, packed, rows)


def _mkl_packing_available() -> bool:
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
    except (AttributeError, RuntimeError):
        return False


MKL_PACKING = _mkl_packing_available()


def _packed_copy(weight: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The packed copy of `weight` and the rows it was packed for, while one exists."""
    entry = _packed.get(id(weight))
    return entry[1:] if entry is not None and entry[0] is weight else None


def is_packed(weight: torch.Tensor) -> bool:
    return _packed_copy(weight) is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, like `F.linear`; through the packed copy of `weight` inside `packed_weights`."""
    packed = _packed_copy(weight)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkl._mkl_linear(x, packed[0], weight, bias, packed[1])


def worth_packing(model: nn.Module, rows: int) -> bool:
    """Whether packing pays for `rows` sequences: fp32 weights on a CPU with MKL and at least 2 rows."""
    weight = model.head_weight
    return MKL_PACKING and rows >= 2 and weight.device.type == "cpu" and weight.dtype == torch.float32


@contextmanager
def packed_weights(model: nn.Module, rows: int) -> Iterator[None]:
    """Inside the block, the model's linear layers and output head multiply through packed weights.

    Does nothing where it would not pay (`worth_packing`). Layers whose forward is already replaced
    (by an enclosing `packed_weights`) are left to it. The packed copies are made from the weights as
    they are on entry: the weights must not change inside the block (generation does not change them).
    """
    if not worth_packing(model, rows):
        yield
        return
    layers = [m for m in model.modules()  # plain nn.Linear only: subclasses (LoRA's) keep their own forward
              if type(m) is nn.Linear and m.weight.dtype == torch.float32 and "forward" not in vars(m)]
    weights = [m.weight for m in layers] + [model.head_weight]
    mine = [w for w in weights if id(w) not in _packed]
    with torch.no_grad():
        for w in mine:
            _packed[id(w)] = (w, torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), rows), rows)
    for m in layers:
        m.forward = lambda x, m=m: linear(x, m.weight, m.bias)
    try:
        yield
    finally:
        for m in layers:
            del m.forward
        for w in mine:
            _packed.pop(id(w), None)
