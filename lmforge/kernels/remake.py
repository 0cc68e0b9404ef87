"""Outputs made again in the backward pass instead of kept (for `lean_norm` and `lean_swiglu`).

    kernels.remake.register(y, fn, x, ...)   # a lean kernel: y = fn(x, ...) may be made again from them
    handles = kernels.remake.install(model)   # around model's forward: layers that keep y keep its recipe

A norm's output and the SwiGLU product are kept for the backward pass by the layer that reads them
(a LoRA adapter's `lora_A`, a trained linear layer's weight gradient), as large as the layer's
activations, beside the input that the norm or SwiGLU keeps anyway. While `model` runs its forward
pass (with autograd, outside torch.compile and other saved-tensor hooks, e.g. activation
checkpointing's, which keeps nothing anyway), saved-tensor hooks give every saved tensor that is (a
view of) a registered output the recipe instead; the backward pass makes it again (one elementwise
pass, the same code on the same inputs, so the very same numbers). The registry holds the outputs
only weakly, and only during the forward pass. An input changed in place after the forward pass is
an error in the backward pass, as autograd's own check.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_live = threading.local()  # .outputs: {storage address: (weak output, recipe)} during a forward pass; .stack


class _Recipe:
    __slots__ = ("fn", "inputs", "versions", "autocast", "shape", "stride", "offset")

    def remake(self) -> torch.Tensor:
        if _versions(self.inputs) != self.versions:
            raise RuntimeError("an input of an output remade in the backward pass was modified in place "
                               "after the forward pass")
        device, enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            return self.fn(*self.inputs).as_strided(self.shape, self.stride, self.offset)


def _versions(inputs: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(x._version for x in inputs if isinstance(x, torch.Tensor))


def register(out: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: Any) -> torch.Tensor:
    """Let layers that keep `out` (= fn(*inputs), deterministic) keep the recipe instead, during a
    forward pass that `install` watches; returns `out`."""
    outputs = getattr(_live, "outputs", None)
    if outputs is not None and out.numel() and out.is_contiguous():
        device = out.device.type
        recipe = _Recipe()
        recipe.fn, recipe.inputs = fn, inputs
        recipe.versions = _versions(inputs)
        recipe.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        outputs[out.untyped_storage().data_ptr()] = (weakref.ref(out), recipe)
    return out


def _pack(t: torch.Tensor) -> Any:
    outputs = getattr(_live, "outputs", None)
    found = outputs.get(t.untyped_storage().data_ptr()) if outputs and t.numel() else None
    if found is None:
        return t
    out = found[0]()  # alive: its storage is, so the address is t's storage's and no other's
    if out is None or out.dtype != t.dtype or out.device != t.device:
        return t
    recipe = _Recipe()
    for name in ("fn", "inputs", "versions", "autocast"):
        setattr(recipe, name, getattr(found[1], name))
    recipe.shape, recipe.stride, recipe.offset = t.shape, t.stride(), t.storage_offset()
    return recipe


def _unpack(saved: Any) -> torch.Tensor:
    return saved.remake() if isinstance(saved, _Recipe) else saved


def _enter(module: nn.Module, args: Any) -> None:
    stack = _live.__dict__.setdefault("stack", [])
    if (not torch.is_grad_enabled() or getattr(_live, "outputs", None) is not None
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
            or torch.compiler.is_compiling()):
        stack.append(None)
        return
    hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
    hooks.__enter__()
    _live.outputs = {}
    stack.append(hooks)


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    stack = _live.__dict__.get("stack")
    hooks = stack.pop() if stack else None
    if hooks is not None:
        _live.outputs = None
        hooks.__exit__(None, None, None)


def install(model: nn.Module) -> None:
    """Watch `model`'s forward passes (see the module docstring); once only; `uninstall` undoes it."""
    if "_lmforge_remake" not in model.__dict__:
        model.__dict__["_lmforge_remake"] = (model.register_forward_pre_hook(_enter),
                                             model.register_forward_hook(_exit, always_call=True))


def installed(model: nn.Module) -> bool:
    return "_lmforge_remake" in model.__dict__


def uninstall(model: nn.Module) -> None:
    for handle in model.__dict__.pop("_lmforge_remake", ()):
        handle.remove()
