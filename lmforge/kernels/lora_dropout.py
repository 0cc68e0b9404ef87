"""LoRA dropout that keeps no copy of its input: the mask is drawn again in the backward pass.

    n = fuse_lora_dropout(peft_model)     # what `kernels.apply(model, for_="train")` does

peft's LoRA computes `lora_B(lora_A(dropout(x)))`. With autograd's dropout (on CPU: a float noise
tensor, multiplied in) the backward pass keeps, for every adapted layer, the noise (as large as x)
and the dropped input that `lora_A` needs for its gradient (as large again), while the frozen base
layer needs neither. On SmolLM2-135M at batch 8 x 255 that was 0.9 GB more than without dropout,
a fifth of LoRA's peak. Drawing the mask (a `torch.bernoulli_` sample per element, ~10 ns each) also
took longer than the adapted layer's own matmul on CPU.

`fuse_lora_dropout` replaces, in every adapted layer of a peft model, the dropout module by an
identity and turns `lora_A` into a `DropoutLinear` (the same module and weight): dropout and
`lora_A` in one autograd function that keeps only x and a random seed, and draws the same mask
again from the seed in the backward pass. x is what `lora_A` keeps without dropout too.
The mask comes from NumPy's PCG64 bit generator on CPU (~1 ns per element), 16 bits per element:
the dropout probability is rounded to a multiple of 1/65536 (0.05 -> 0.0500031), and the kept
values are scaled by exactly the inverse of the keep probability, so the expectation is unchanged.
Seeds are drawn from PyTorch's own random state, so a step is reproduced by `torch.manual_seed`
(the Trainer's resumes) and by activation checkpointing's recomputation. Works on any device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels.swap import swap, unswap

_LEVELS = 1 << 16  # the mask's resolution: 16 random bits per element
WHY = ("LoRA dropout fused into lora_A: keeps x and a seed instead of a noise tensor and a dropped copy of x, "
       "and draws the mask faster")


def keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device,
              dtype: torch.dtype = torch.bool) -> tuple[torch.Tensor, float]:
    """The mask (1 = kept, 0 = dropped; bool or `dtype`) of dropout probability ~`p` drawn from `seed`,
    and the kept values' scale."""
    drop = round(p * _LEVELS)
    n = math.prod(shape)
    if device.type == "cpu":
        bits = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]
        keep = bits >= drop
        # multiplying by a float mask is ~2.5x faster than torch.where on a bool one (CPU)
        keep = torch.from_numpy(keep if dtype == torch.bool else keep.astype(np.float32)).view(shape)
    else:
        generator = torch.Generator(device=device).manual_seed(seed)
        keep = torch.randint(0, _LEVELS, shape, generator=generator, device=device, dtype=torch.int32) >= drop
    return keep.to(dtype), _LEVELS / (_LEVELS - drop)


class _DropoutLinear(torch.autograd.Function):
    """dropout(x) @ weight.T with the dropout scale applied to the (narrow) output; keeps x and a seed."""

    @staticmethod
    def forward(ctx, x, weight, p, seed):
        keep, scale = keep_mask(x.shape, p, seed, x.device, x.dtype)
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return F.linear(x * keep, weight) * scale

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        keep, scale = keep_mask(x.shape, ctx.p, ctx.seed, x.device, x.dtype)
        grad = grad * scale  # in the forward output's dtype: that of x and weight, or autocast's
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype).mul_(keep)
        if ctx.needs_input_grad[1]:
            dropped = (x * keep).reshape(-1, x.shape[-1]).to(grad.dtype)
            grad_w = (grad.reshape(-1, grad.shape[-1]).T @ dropped).to(weight.dtype)
        return grad_x, grad_w, None, None


class DropoutLinear(nn.Linear):
    """A bias-free Linear (a LoRA `A` matrix) that applies dropout `p` to its input in training mode."""

    kernel = "lora_dropout"
    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return _DropoutLinear.apply(x, self.weight, self.p, seed)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers, known by their parts (this package imports no model library): adapters
    `lora_A` and their `lora_dropout`, each a ModuleDict keyed by adapter name."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and isinstance(getattr(m, "lora_dropout", None),
                                                                                     nn.ModuleDict)]


def fuse_lora_dropout(model: nn.Module) -> list[str]:
    """Fuse each peft LoRA Linear's dropout into its `lora_A` (see the module docstring); returns the
    names of the fused `lora_A` layers."""
    names = {id(m): name for name, m in model.named_modules()}
    fused = []
    for module in _lora_layers(model):
        for adapter, dropout in module.lora_dropout.items():
            a = module.lora_A[adapter] if adapter in module.lora_A else None  # LoRA on an embedding: none
            if not isinstance(dropout, nn.Dropout) or type(a) is not nn.Linear or a.bias is not None \
                    or adapter in getattr(module, "lora_variant", {}):
                continue
            swap(a, DropoutLinear, p=dropout.p)
            module.lora_dropout[adapter] = nn.Identity()
            fused.append(names[id(a)])
    return fused


def unfuse_lora_dropout(model: nn.Module) -> None:
    """Undo `fuse_lora_dropout`: peft's own dropout modules again."""
    for module in _lora_layers(model):
        for adapter, a in module.lora_A.items():
            if isinstance(a, DropoutLinear):
                module.lora_dropout[adapter] = nn.Dropout(a.p)
                unswap(a)
