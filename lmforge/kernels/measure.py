"""Whether a speed kernel is faster than PyTorch's own way on this machine: raced once, then remembered.

    from lmforge.kernels import measure
    measure.verdict("fp32_linear", torch.bfloat16)          # Verdict(use=..., why=..., ms={...})
    measure.verdict("packed_mkl", torch.float32, rows=8)
    measure.everything()                                   # every race this machine can run (`lmforge env`)

A CPU's flags do not say which kernel is fast: without AMX tiles, bf16 matmuls run at half the fp32
rate on an Intel Xeon but at 4x it on an AMD Zen 4 (avx512_bf16), and packing fp32 weights for MKL
speeds up an 8-row generation step by 1.45x on the one and slows it by 1.4x on the other, where
oneDNN's packing may win instead. So each
speed kernel races PyTorch's own kernel on the shapes it would serve, at its first use on a machine:

| kernel | race (both ways, forward and backward where it trains) |
|---|---|
| `fp32_linear` | a 2048 x 512 -> 2048 linear layer in bf16/fp16: native against multiplied in fp32 |
| `fp32_attention` | causal attention, 4 x 8 heads x 256 x 64: native against fp32 copies |
| `fp32_loss` | a 1024 x 512 -> 8192 output head and cross-entropy: native against fp32 copies |
| `packed_mkl`, `packed_onednn` | the linear layers of 3 GPT-2 (124M) blocks at 1 or 8 rows: plain against packed |

fp32 weights are packed for MKL or for oneDNN, bf16 ones for oneDNN. A kernel is used where it is at
least `MARGIN` (5%) faster; a tie keeps PyTorch's own kernel. Packing is also timed, and a generate
call packs only where its steps win that time back (an fp32 step at 1 row may gain 10% but take 300
steps to repay the packing). The timings are cached per machine (`lmforge.perf.measured`: CPU model,
cores, threads, torch version), so only the first run on a machine pays for the races (about a
second each); a race that other processes disturbed decides for this run only. `LMFORGE_KERNELS`
overrides any verdict: `LMFORGE_KERNELS=fp32_linear=on,packed_mkl=off` (`on`: used wherever it can
run; `off`: never), and `LMFORGE_KERNELS=off` turns every kernel off.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lmforge import perf
from lmforge.errors import UserError
from lmforge.kernels import cpu
from lmforge.kernels.linear import REDUCED, LinearInFp32, pack
from lmforge.kernels.upcast import fp32_attention

SWITCH = "LMFORGE_KERNELS"
MARGIN = 0.05  # a kernel must beat PyTorch's own kernel by this much to be used
RACED = ("fp32_linear", "fp32_attention", "fp32_loss", "packed_mkl", "packed_onednn")
SETTINGS = ("on", "off", "auto")
Candidates = dict[str, Callable[[], Any]]  # "plain", "kernel" (and "pack") -> one timed call


@dataclass(frozen=True)
class Verdict:
    """Whether `kernel` is used for `case`, why, and the race's best times in ms ({} where not raced)."""

    kernel: str
    case: str
    use: bool
    why: str
    ms: dict[str, float] = field(default_factory=dict)


def overrides() -> dict[str, str]:
    """The per-kernel settings of LMFORGE_KERNELS ({kernel: "on"|"off"|"auto"}); {} for "", "off", "on"."""
    text = os.environ.get(SWITCH, "").strip().lower()
    if "=" not in text:
        return {}
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kernel, _, setting = item.partition("=")
        kernel, setting = kernel.strip(), setting.strip()
        if kernel not in RACED or setting not in SETTINGS:
            raise UserError(f"{SWITCH}={os.environ[SWITCH]!r}: {item!r} is not KERNEL=on|off|auto "
                             f"with KERNEL one of {', '.join(RACED)}")
        out[kernel] = setting
    return out


def decide(kernel: str, case: str, ms: dict[str, float], margin: float = MARGIN, steps: int | None = None) -> Verdict:
    """The verdict of a race between "plain" (PyTorch's own kernel) and "kernel". Where the race also
    timed "pack" (making the packed weights, once per generate call) and the call's `steps` are known,
    the kernel must also win the packing time back within those steps."""
    plain, faster = ms["plain"], ms["kernel"]
    speedup = plain / faster if faster > 0 else float("inf")
    times = f"{faster:.2f} ms against {plain:.2f} ms with PyTorch's own kernel"
    if speedup < 1 + margin:
        return Verdict(kernel, case, False, f"measured {speedup:.2f}x, not {1 + margin:.2f}x or more: {times}", ms)
    why = f"measured {speedup:.2f}x faster: {times}"
    if "pack" in ms:
        breakeven = math.ceil(ms["pack"] / (plain - faster))
        why += f"; packing ({ms['pack']:.0f} ms) pays back after {breakeven} steps"
        if steps is not None and breakeven > steps:
            return Verdict(kernel, case, False, f"{why}, more than this call's {steps}", ms)
    return Verdict(kernel, case, True, why, ms)


def _rows_case(rows: int) -> int:
    return 1 if rows <= 1 else 8


def case_of(kernel: str, dtype: torch.dtype, rows: int | None = None) -> str:
    name = str(dtype).removeprefix("torch.")
    if not kernel.startswith("packed"):
        return name
    return f"{name}, 1 row" if _rows_case(rows or 1) == 1 else f"{name}, 8 rows"


def verdict(kernel: str, dtype: torch.dtype, rows: int | None = None, tiny: bool = False,
            steps: int | None = None) -> Verdict:
    """Whether `kernel` pays on this machine for `dtype` weights (and, for packing, `rows` rows a step
    during a call of `steps` steps, where known): LMFORGE_KERNELS where it says so, else the race, run
    once per machine (`tiny`: on tiny shapes, for tests; not cached)."""
    case = case_of(kernel, dtype, rows)
    setting = overrides().get(kernel, "auto")
    if setting != "auto":
        return Verdict(kernel, case, setting == "on", f"set {setting} by {SWITCH}")
    run = lambda: race(kernel, dtype, _rows_case(rows or 1), tiny)  # noqa: E731
    ms = run() if tiny else perf.measured(f"kernel/{kernel}/{case}", run)
    return decide(kernel, case, ms, steps=steps)


def race(kernel: str, dtype: torch.dtype, rows: int = 8, tiny: bool = False, seconds: float = 0.4) -> dict[str, float]:
    """Best times in ms of PyTorch's own kernel ("plain") and `kernel` ("kernel") on the shapes of the
    module docstring's table (`tiny`: shapes a few hundred times smaller)."""
    with torch.no_grad() if kernel.startswith("packed") else torch.enable_grad():
        return perf.race(RACES[kernel](dtype, rows, tiny), seconds=0.05 if tiny else seconds)


def _randn(*shape: int, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    return (torch.randn(*shape, generator=g) * 0.05).to(dtype).requires_grad_(grad)


def _backward(out: torch.Tensor, grad: torch.Tensor, *leaves: torch.Tensor) -> None:
    out.backward(grad)
    for leaf in leaves:
        leaf.grad = None


def _linear_race(dtype: torch.dtype, rows: int, tiny: bool) -> Candidates:
    n, d_in, d_out = (64, 32, 48) if tiny else (2048, 512, 2048)
    x, w = _randn(n, d_in, dtype=dtype, grad=True), _randn(d_out, d_in, dtype=dtype, grad=True)
    g = _randn(n, d_out, dtype=dtype)
    return {"plain": lambda: _backward(F.linear(x, w), g, x, w),
            "kernel": lambda: _backward(LinearInFp32.apply(x, w, None), g, x, w)}


def _attention_race(dtype: torch.dtype, rows: int, tiny: bool) -> Candidates:
    b, h, t, d = (1, 2, 16, 8) if tiny else (4, 8, 256, 64)
    q, k, v = (_randn(b, h, t, d, dtype=dtype, grad=True) for _ in range(3))
    g = _randn(b, h, t, d, dtype=dtype)
    upcast = fp32_attention(F.scaled_dot_product_attention)
    return {"plain": lambda: _backward(F.scaled_dot_product_attention(q, k, v, is_causal=True), g, q, k, v),
            "kernel": lambda: _backward(upcast(q, k, v, is_causal=True), g, q, k, v)}


def _loss_race(dtype: torch.dtype, rows: int, tiny: bool) -> Candidates:
    n, d, vocab = (64, 32, 96) if tiny else (1024, 512, 8192)
    h, w = _randn(n, d, dtype=dtype, grad=True), _randn(vocab, d, dtype=dtype, grad=True)
    targets = torch.arange(n) * 7 % vocab

    def loss(h: torch.Tensor, w: torch.Tensor) -> None:
        F.cross_entropy(F.linear(h, w).float(), targets).backward()

    def clear() -> None:
        h.grad = w.grad = None

    return {"plain": lambda: (loss(h, w), clear()), "kernel": lambda: (loss(h.float(), w.float()), clear())}


GPT2_BLOCK = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of each linear layer


def _packing_race(packing: str) -> Callable[..., Candidates]:
    def make(dtype: torch.dtype, rows: int, tiny: bool) -> Candidates:
        shapes = [(32, 48), (48, 32)] if tiny else GPT2_BLOCK * 3
        weights = [_randn(d_out, d_in, dtype=dtype) for d_in, d_out in shapes]
        inputs = {d_in: _randn(rows, d_in, dtype=dtype) for d_in, _ in shapes}
        packed = [pack(w, rows, packing) for w in weights]

        def plain() -> None:
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

        def fast() -> None:
            for w, p in zip(weights, packed):
                x = inputs[w.shape[1]]
                if packing == "mkl":
                    torch.ops.mkl._mkl_linear(x, p, w, None, rows)
                else:
                    torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

        return {"plain": plain, "kernel": fast, "pack": lambda: [pack(w, rows, packing) for w in weights]}

    return make


RACES: dict[str, Callable[..., Candidates]] = {
    "fp32_linear": _linear_race,
    "fp32_attention": _attention_race,
    "fp32_loss": _loss_race,
    "packed_mkl": _packing_race("mkl"),
    "packed_onednn": _packing_race("onednn"),
}


def runnable() -> list[tuple[str, torch.dtype, int | None]]:
    """The (kernel, dtype, rows) cases this machine and PyTorch build can race."""
    cases: list[tuple[str, torch.dtype, int | None]] = [
        ("fp32_linear", torch.bfloat16, None), ("fp32_attention", torch.bfloat16, None),
        ("fp32_loss", torch.bfloat16, None)]
    for dtype in (torch.float32, torch.bfloat16):
        cases += [(kernel, dtype, rows) for kernel in packings(dtype) for rows in (1, 8)]
    return cases


def fp32_worth_it(weight: torch.Tensor, kernel: str = "fp32_linear") -> bool:
    """Whether `kernel` (`fp32_linear`, `fp32_attention` or `fp32_loss`) pays for a layer with this
    weight: a bf16/fp16 weight on a CPU where the race says so."""
    return weight.device.type == "cpu" and weight.dtype in REDUCED and verdict(kernel, weight.dtype).use


def packings(dtype: torch.dtype) -> list[str]:
    """The packed kernels this PyTorch build and CPU have for weights of `dtype`."""
    if dtype == torch.float32:
        return [k for k, ok in (("packed_mkl", cpu.mkl_packing()), ("packed_onednn", cpu.onednn_packing())) if ok]
    return ["packed_onednn"] if dtype == torch.bfloat16 and cpu.onednn_bf16_packing() else []


def packing_verdicts(dtype: torch.dtype, rows: int, steps: int | None = None) -> list[Verdict]:
    """The verdict of each packed kernel for `dtype` weights at `rows` rows over `steps` steps."""
    return [verdict(kernel, dtype, rows, steps=steps) for kernel in packings(dtype)]


def packing_for(weight: torch.Tensor, rows: int, steps: int | None = None) -> str | None:
    """How a CPU weight is packed for `rows` rows a step over `steps` steps ("mkl" or "onednn": the
    faster of those that won their race), or None where none did or this PyTorch build has none."""
    if weight.device.type != "cpu":
        return None
    won = [v for v in packing_verdicts(weight.dtype, rows, steps) if v.use]
    best = min(won, key=lambda v: v.ms.get("kernel", 0.0), default=None)
    return best.kernel.removeprefix("packed_") if best else None


def everything() -> list[Verdict]:
    """The verdict of every race this machine can run (racing those not cached yet)."""
    return [verdict(kernel, dtype, rows) for kernel, dtype, rows in runnable()]
