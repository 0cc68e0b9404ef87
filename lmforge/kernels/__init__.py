"""Opt-in hardware speed-ups, applied to a model from outside it (torchao style).

    from lmforge import kernels
    kernels.apply(model, for_="train")       # what the Trainer does; returns what it chose, as a dict
    with kernels.generating(model, rows=8):  # what the generate loop and beam search do around their steps
        logits = model(ids, cache=cache, last_only=True)
    kernels.report(model)                    # the hardware, the rules and what is applied to which layers
    kernels.remove(model)                    # the plain model again
    LMFORGE_KERNELS=off                      # no kernels anywhere (or enabled=False to `apply`/`generating`)

`lmforge.models` is plain PyTorch that runs on any device and never imports this package, which
never imports it either. The kernels know a model only through what any PyTorch model has, and a
few documented hooks:
- `nn.Linear` layers: a kernel swaps the layer's class in place (`swap.swap`: the same module,
  parameters and state-dict keys; another forward) and `remove` swaps it back;
- functions that modules hold as attributes, each with a documented contract, which a kernel wraps
  or replaces by an equivalent: `sdpa` (the signature of `F.scaled_dot_product_attention`; lmforge's
  `Attention`), `linear_cross_entropy` (h (N, d), weight (V, d), targets (N,) -> mean loss; lmforge's
  models), `swiglu` (h = [gate, up] (..., 2F) -> silu(gate) * up; lmforge's SwiGLU `MLP`), `rms_norm`
  ((x, weight, eps) -> x / rms(x) * weight in fp32, in x's dtype; lmforge's `RMSNorm`) and `layer_norm`
  ((x, weight, bias, eps) -> `F.layer_norm` on the last dimension; lmforge's `LayerNorm`);
- the model's forward pass, for the lean kernels: while it runs, saved-tensor hooks (a forward
  pre-hook and hook on the model `apply` is given) let the layers that read a lean kernel's output
  keep a recipe for it instead (`remake`).
- peft's LoRA layers, known by their parts (`lora_A`, `lora_dropout`).

What is chosen: the speed kernels by a race against PyTorch's own kernel on this machine, run at
first use and cached per machine (`lmforge.kernels.measure`; `lmforge env` shows the verdicts and
timings; `LMFORGE_KERNELS=KERNEL=on|off,...` overrides one); the memory kernels by rule:

| kernel | for | where | module |
|---|---|---|---|
| `fp32_linear` | train | nn.Linear with bf16/fp16 weights on a CPU, where it won its race | `linear.Fp32Linear` |
| `fp32_attention`, `fp32_loss` | train | the `sdpa` / `linear_cross_entropy` hooks, where each won | `upcast` |
| `lean_swiglu` | train | the `swiglu` hooks, any device (memory: keeps only its input) | `swiglu`, `remake` |
| `lean_norm` | train | the `rms_norm` / `layer_norm` hooks, any device (memory: keeps its input) | `norm`, `remake` |
| `lora_dropout` | train | peft LoRA layers with dropout, any device (memory and speed) | `lora_dropout` |
| `packed_mkl` | generate | nn.Linear, fp32 weights, MKL; where it won at 1 or 8 rows | `linear.PackedLinear` |
| `packed_onednn` | generate | nn.Linear, fp32 or bf16 weights, oneDNN; where it won | `linear.PackedLinear` |

Packed copies are made only where they take at most half the memory still available, and live only
inside `generating` (they are copies of the weights as they were on entry). Each module's
docstring says what its kernel does and what it was measured to give.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from lmforge.kernels import cpu, measure, remake
from lmforge.kernels.linear import FP32_WHY, PACKED_WHY, REDUCED, Fp32Linear, PackedLinear, pack
from lmforge.kernels.lora_dropout import WHY as LORA_WHY
from lmforge.kernels.lora_dropout import DropoutLinear, fuse_lora_dropout, unfuse_lora_dropout
from lmforge.kernels.measure import SWITCH, fp32_worth_it, packing_for
from lmforge.kernels.norm import WHY as NORM_WHY
from lmforge.kernels.norm import lean_layer_norm, lean_rms_norm
from lmforge.kernels.swap import swap, swapped, unswap
from lmforge.kernels.swiglu import WHY as SWIGLU_WHY
from lmforge.kernels.swiglu import lean_swiglu
from lmforge.kernels.upcast import ATTENTION_WHY, LOSS_WHY, fp32_attention, fp32_cross_entropy

__all__ = ["SWITCH", "apply", "generating", "remove", "report", "switched_on"]

HOOKS = {  # hook -> kernel, wrapper, why, whether it pays for a module
    "sdpa": ("fp32_attention", fp32_attention, ATTENTION_WHY, lambda m: _first_weight_worth_fp32(m, "fp32_attention")),
    "linear_cross_entropy": ("fp32_loss", fp32_cross_entropy, LOSS_WHY,
                             lambda m: _first_weight_worth_fp32(m, "fp32_loss")),
    "swiglu": ("lean_swiglu", lean_swiglu, SWIGLU_WHY, lambda m: True),
    "rms_norm": ("lean_norm", lean_rms_norm, NORM_WHY, lambda m: True),
    "layer_norm": ("lean_norm", lean_layer_norm, NORM_WHY, lambda m: True),
}
LEAN = ("lean_swiglu", "lean_norm")  # kernels whose outputs are remade in the backward pass (`remake`)
RULES = {
    "fp32_linear": FP32_WHY,
    "fp32_attention": ATTENTION_WHY,
    "fp32_loss": LOSS_WHY,
    "lean_swiglu": SWIGLU_WHY,
    "lean_norm": NORM_WHY,
    "lora_dropout": LORA_WHY,
    "packed_mkl": PACKED_WHY["mkl"].format(dtype="fp32", rows="1 or more"),
    "packed_onednn": PACKED_WHY["onednn"].format(dtype="fp32 or bf16", rows="1 or more"),
}


def switched_on(enabled: bool | None = None) -> bool:
    """Whether kernels are used: `enabled` when given, else off where LMFORGE_KERNELS is off/0/false/no."""
    if enabled is not None:
        return enabled
    return os.environ.get(SWITCH, "").strip().lower() not in ("off", "0", "false", "no")


def apply(model: nn.Module, for_: str = "train", rows: int = 1, enabled: bool | None = None,
          steps: int | None = None) -> dict[str, Any]:
    """Swap in the kernels that pay on this hardware for training (`for_="train"`) or for generating
    `rows` sequences at a time for `steps` steps, where known (`for_="generate"`; prefer `generating`,
    which also takes them out).

    Returns {"enabled", "for", "applied": {kernel: {"why", "layers"}}, "skipped": {kernel: why}}.
    Applying twice changes nothing more.
    """
    if for_ not in ("train", "generate"):
        raise ValueError(f"kernels for {for_!r}; expected 'train' or 'generate'")
    out: dict[str, Any] = {"enabled": switched_on(enabled), "for": for_, "applied": {}, "skipped": {}}
    if not out["enabled"]:
        out["skipped"]["all"] = f"switched off ({SWITCH}=off or enabled=False)"
    elif not isinstance(model, nn.Module):
        out["skipped"]["all"] = f"{type(model).__name__} is not an nn.Module: no layers to swap"
    elif for_ == "train":
        _apply_for_training(model, out)
    else:
        _apply_for_generation(model, rows, steps, out)
    return out


def _apply_for_training(model: nn.Module, out: dict[str, Any]) -> None:
    names = {id(m): name for name, m in model.named_modules()}
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    chosen = [m for m in linears if fp32_worth_it(m.weight)]
    for m in chosen:
        swap(m, Fp32Linear)
    _record(out, "fp32_linear", FP32_WHY, [names[id(m)] for m in chosen])
    if linears and not chosen:
        out["skipped"]["fp32_linear"] = _why_not_fp32(linears[0].weight)
    for hook, (kernel, wrap, why, pays) in HOOKS.items():
        hooked = [m for m in model.modules() if _plain_hook(m, hook) and pays(m)]
        for m in hooked:
            setattr(m, hook, wrap(getattr(m, hook)))
        _record(out, kernel, why, [names[id(m)] for m in hooked])
    _record(out, "lora_dropout", LORA_WHY, fuse_lora_dropout(model))
    if any(kernel in out["applied"] for kernel in LEAN):
        remake.install(model)


def _plain_hook(module: nn.Module, hook: str) -> bool:
    """Whether `module` holds a hook function `hook` (not a submodule of that name) with no kernel yet."""
    function = getattr(module, hook, None)
    return callable(function) and not isinstance(function, nn.Module) and not hasattr(function, "kernel")


def _apply_for_generation(model: nn.Module, rows: int, steps: int | None, out: dict[str, Any]) -> None:
    candidates = [(name, m) for name, m in model.named_modules() if type(m) in (nn.Linear, Fp32Linear)]
    chosen = [(name, m, packing_for(m.weight, rows, steps)) for name, m in candidates]
    chosen = [(name, m, packing) for name, m, packing in chosen if packing is not None]
    if not chosen:
        if candidates:
            out["skipped"]["packed"] = _why_not_packed(candidates[0][1].weight, rows, steps)
        return
    weights = {id(m.weight): m.weight for _, m, _ in chosen}
    size, available = sum(w.nbytes for w in weights.values()), cpu.available_memory()
    if 2 * size > available:
        out["skipped"]["packed"] = (f"the packed copies ({size / 2**20:.0f} MB) would take more than half the "
                                    f"memory still available ({available / 2**20:.0f} MB)")
        return
    copies = {}
    for name, m, packing in chosen:
        if id(m.weight) not in copies:
            copies[id(m.weight)] = pack(m.weight, rows, packing)
        swap(m, PackedLinear, packed_weight=copies[id(m.weight)], packing=packing, packed_rows=rows)
        _record(out, f"packed_{packing}", _packed_why(m, packing, rows), [name])


@contextmanager
def generating(model: nn.Module, rows: int, enabled: bool | None = None,
               steps: int | None = None) -> Iterator[dict[str, Any]]:
    """Inside the block, the model's linear layers multiply through packed weights where that pays for
    `rows` rows over `steps` steps (see the table in the module docstring); yields what `apply` returns.
    The weights must not change inside the block (generation does not change them). Layers already
    packed by an enclosing block are left to it."""
    chosen = apply(model, "generate", rows, enabled, steps)
    try:
        yield chosen
    finally:
        mine = {name for entry in chosen["applied"].values() for name in entry["layers"]}
        for name, m in model.named_modules() if mine else ():
            if name in mine and isinstance(m, PackedLinear):
                unswap(m)


def remove(model: nn.Module) -> None:
    """Take every kernel out of `model`: the plain layers and functions again."""
    unfuse_lora_dropout(model)
    for m in model.modules():
        remake.uninstall(m)
        while swapped(m) and isinstance(m, (Fp32Linear, PackedLinear)):
            unswap(m)
        for hook in HOOKS:
            function = m.__dict__.get(hook)
            if hasattr(function, "kernel"):
                delattr(m, hook)
                if getattr(m, hook, None) is not function.inner:  # the plain function was the module's own
                    setattr(m, hook, function.inner)


def report(model: nn.Module | None = None) -> dict[str, Any]:
    """What the kernels' choices rest on, as a dict (for `lmforge env`): the switch, the hardware facts,
    the rules, and with a model, the kernels applied to it: {kernel: {"why", "layers"}}."""
    out: dict[str, Any] = {"enabled": switched_on(), "switch": f"{SWITCH}={os.environ.get(SWITCH, '')}",
                           "hardware": cpu.facts(), "rules": dict(RULES)}
    if model is None:
        return out
    applied: dict[str, Any] = {"applied": {}}
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            _record(applied, f"packed_{m.packing}", _packed_why(m, m.packing, m.packed_rows), [name])
        elif isinstance(m, (Fp32Linear, DropoutLinear)):
            _record(applied, m.kernel, RULES[m.kernel], [name])
        for hook, (kernel, _, why, _) in HOOKS.items():
            if hasattr(m.__dict__.get(hook), "kernel"):
                _record(applied, kernel, why, [name])
    out["applied"] = applied["applied"]
    return out


def _record(out: dict[str, Any], kernel: str, why: str, layers: list[str]) -> None:
    if layers:
        entry = out["applied"].setdefault(kernel, {"why": why, "layers": []})
        entry["layers"] += layers


def _packed_why(layer: nn.Linear, packing: str, rows: int) -> str:
    return PACKED_WHY[packing].format(dtype=str(layer.weight.dtype).removeprefix("torch."), rows=rows)


def _first_weight_worth_fp32(module: nn.Module, kernel: str) -> bool:
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    return weight is not None and fp32_worth_it(weight, kernel)


def _why_not_fp32(weight) -> str:
    if weight.device.type != "cpu":
        return f"weights on {weight.device.type}: PyTorch's own kernels"
    if weight.dtype not in REDUCED:
        return f"{str(weight.dtype).removeprefix('torch.')} weights: PyTorch's own kernels"
    return measure.verdict("fp32_linear", weight.dtype).why


def _why_not_packed(weight, rows: int, steps: int | None) -> str:
    if weight.device.type != "cpu":
        return f"weights on {weight.device.type}: nothing to pack"
    verdicts = measure.packing_verdicts(weight.dtype, rows, steps)
    if verdicts:
        return "; ".join(f"{v.kernel}: {v.why}" for v in verdicts)
    return f"{str(weight.dtype).removeprefix('torch.')} weights: no packed kernel in this PyTorch build or CPU"
