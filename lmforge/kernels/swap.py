"""How a kernel takes over a module in place, and gives it back.

    swap(layer, PackedLinear, packed_weight=w, packing="mkl")   # the same module, another class
    unswap(layer)                                              # its previous class, extra attributes gone

Swapping the class (not the module) keeps everything that refers to the module working: its
parameters and state-dict keys, hooks, a peft wrapper around it, DistributedDataParallel. Swaps
stack (a packed layer of a model with training kernels goes back to its training kernel).
"""

from __future__ import annotations

from typing import Any

from torch import nn

_UNDO = "_kernel_swaps"  # module attribute: a stack of (previous class, names of the attributes added)


def swap(module: nn.Module, cls: type[nn.Module], **attributes: Any) -> None:
    """Make `module` an instance of `cls` (a subclass of its class's base) with `attributes` set."""
    stack = module.__dict__.setdefault(_UNDO, [])
    stack.append((type(module), tuple(attributes)))
    module.__class__ = cls
    for name, value in attributes.items():
        setattr(module, name, value)


def unswap(module: nn.Module) -> None:
    """Undo the latest `swap` of `module`."""
    previous, names = module.__dict__[_UNDO].pop()
    for name in names:
        delattr(module, name)
    module.__class__ = previous
    if not module.__dict__[_UNDO]:
        del module.__dict__[_UNDO]


def swapped(module: nn.Module) -> bool:
    return bool(module.__dict__.get(_UNDO))
