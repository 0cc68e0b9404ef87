"""Weight-only quantized linear layers: int8 per output channel, int4 in groups, and the low-bit kernels.

    layer = QuantizedLinear.from_weight(linear.weight, linear.bias, bits=4, group_size=32)   # round to nearest
    y = layer(x)                                 # x (..., in) -> (..., out) in x's dtype, through the fastest kernel
    w = layer.dequantize()                       # the weight it stands for (out, in), fp32
    quantize_layers(model, {"bits": 4, "group_size": 32, "layers": [...]})  # empty layers in place, for loading

**Storage** (what `model.safetensors` holds, the same on every machine), per layer `NAME`:
- int8: `NAME.qweight` int8 (out, in) and `NAME.scales` (out,): w = q * scale (symmetric, q in -127..127);
- int4: `NAME.qweight` uint8 (out, in / 2), two 4-bit values per byte (the even column in the low
  nibble), `NAME.scales` and `NAME.zeros` (out, in / group_size): w = (q - 8) * scale + zero, q in 0..15
  (asymmetric: `zero` is where q = 8 lands; the layout of PyTorch's int4 kernels and of GGUF's Q4_0,
  Q4_1 and Q4_K blocks, which thus import exactly).

**Kernels**, chosen by a race on this machine (as `lmforge.kernels.measure` chooses), per number of
rows a call multiplies (1, up to 8, more: a prompt), cached per machine:

| kernel | bits | what |
|---|---|---|
| `int4pack_bf16`, `int4pack_fp32` | 4 | `aten._weight_int4pack_mm_for_cpu`, weights packed once, bf16 / fp32 inputs |
| `int8pack_bf16`, `int8pack_fp32` | 8 | `aten._weight_int8pack_mm`, activations in bf16 / fp32 |
| `dequantize` | 4, 8 | the fp32 weight made again at each call, then `F.linear` (any device; the plain way) |

On a GPU (and with LMFORGE_KERNELS=off) the layer dequantizes. Measured on a 2-core AMD EPYC Zen 4,
a GPT-2 block's linear layers at 1 row: int4pack_bf16 0.40 ms, int8pack_bf16 0.80 ms, int8pack_fp32
3.9 ms, int4pack_fp32 7.0 ms, fp32 weights (packed for oneDNN) 5.05 ms: with fp32 activations the int4
kernel is slower than no quantization at all (why each is raced, not assumed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import perf
from lmforge.kernels.measure import SWITCH

BITS = (4, 8)
KERNELS = {4: ("int4pack_bf16", "int4pack_fp32", "dequantize"), 8: ("int8pack_bf16", "int8pack_fp32", "dequantize")}
RACE_ROWS = {"1 row": 1, "8 rows": 8, "prompt": 128}
RACE_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out): the linear layers of a GPT-2 block


def rows_case(rows: int) -> str:
    return "1 row" if rows <= 1 else "8 rows" if rows <= 8 else "prompt"


# ----------------------------------------------------------------------------------------------
# quantizing a weight (round to nearest) and making it again


def int4_grid(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The asymmetric 4-bit grid of each group of `group_size` columns of w (out, in): scales and zeros
    (out, in / group_size), such that w ~ (q - 8) * scale + zero with q in 0..15."""
    groups = w.float().reshape(w.shape[0], -1, group_size)
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-8)
    return scales, low + 8 * scales


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes (uint8, 0..15) of w (out, in) on the grid of `int4_grid`."""
    group_size = w.shape[1] // scales.shape[1]
    s, z = scales.repeat_interleave(group_size, 1), zeros.repeat_interleave(group_size, 1)
    return ((w.float() - z) / s + 8).round().clamp(0, 15).to(torch.uint8)


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """The symmetric per-output-channel scales (out,) of w (out, in): w ~ q * scale, q in -127..127."""
    return (w.float().abs().amax(1) / 127).clamp(min=1e-8)


def int8_codes(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (w.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (out, in) of 0..15 -> (out, in / 2), the even column in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (out, in / 2) -> uint8 codes (out, in)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(1)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The fp32 weight (out, in) that stored codes and scales stand for (the module docstring's formulas)."""
    if bits == 8:
        return qweight.float() * scales.float()[:, None]
    codes = unpack_nibbles(qweight).float()
    group_size = codes.shape[1] // scales.shape[1]
    s = scales.float().repeat_interleave(group_size, 1)
    return (codes - 8) * s + zeros.float().repeat_interleave(group_size, 1)


# ----------------------------------------------------------------------------------------------
# the layer


class QuantizedLinear(nn.Module):
    """A linear layer with an int8 or int4 weight (the module docstring's storage) and a float bias."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = True, device: torch.device | str | None = None):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits = {bits}; expected 4 or 8")
        group_size = in_features if bits == 8 or not group_size else group_size
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide the layer's {in_features} inputs")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, device=device))
            self.zeros = None
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.ones(out_features, groups, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, groups, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._prepared: dict[str, Any] = {}  # kernel -> what it multiplies with (made at first use)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
                    group_size: int | None = None) -> QuantizedLinear:
        """The layer for a float weight (out, in), rounded to the nearest point of its grid."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bits, group_size, bias is not None, device=weight.device)
        if bits == 8:
            scales = int8_scales(weight)
            layer.set_codes(int8_codes(weight, scales), scales)
        else:
            scales, zeros = int4_grid(weight, layer.group_size)
            layer.set_codes(int4_codes(weight, scales, zeros), scales, zeros)
        if bias is not None:
            layer.bias.copy_(bias.float())
        return layer

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> None:
        """Store codes (out, in: int8 for 8 bits, uint8 0..15 for 4) with their scales (and zeros)."""
        self.qweight = (codes if self.bits == 8 else pack_nibbles(codes)).to(self.qweight.device).contiguous()
        self.scales = scales.float().to(self.qweight.device).contiguous()
        if self.bits == 4:
            self.zeros = zeros.float().to(self.qweight.device).contiguous()
        self._prepared.clear()

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (out, in) this layer stands for."""
        return dequantize(self.qweight, self.scales, self.zeros, self.bits)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that reads a linear layer's weight; made at each read)."""
        return self.dequantize()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepared.clear()
        super()._load_from_state_dict(*args, **kwargs)
        if self.qweight.device.type == "cpu" and self.qweight.data_ptr() % 64:
            # safetensors' tensors lie wherever the file put them; PyTorch's int8 kernel reads its weight
            # with aligned vector loads (a misaligned one crashed it): a copy of our own
            self.qweight = self.qweight.clone()

    def _apply(self, fn, recurse=True):
        self._prepared.clear()  # moved or cast: the packed copies are made again at the next call
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        kernel = kernel_for(self.bits, self.group_size, rows, x.device)
        flat = x.reshape(rows, self.in_features).contiguous()  # the low-bit kernels read rows back to back
        y = KERNEL_CALLS[kernel](self, flat)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def prepared(self, kernel: str) -> Any:
        """What `kernel` multiplies with, made once (packed weights, scales in the activations' dtype)."""
        if kernel not in self._prepared:
            self._prepared[kernel] = PREPARE[kernel](self)
        return self._prepared[kernel]


def _int4_packed(layer: QuantizedLinear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    codes = unpack_nibbles(layer.qweight).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scales_and_zeros = torch.stack([layer.scales.t(), layer.zeros.t()], dim=-1)  # (groups, out, 2)
    return packed, scales_and_zeros.to(dtype).contiguous()


PREPARE: dict[str, Callable[[QuantizedLinear], Any]] = {
    "int4pack_bf16": lambda m: _int4_packed(m, torch.bfloat16),
    "int4pack_fp32": lambda m: _int4_packed(m, torch.float32),
    "int8pack_bf16": lambda m: m.scales.to(torch.bfloat16),
    "int8pack_fp32": lambda m: m.scales.float(),
    "dequantize": lambda m: None,
}


def _int4pack(dtype: torch.dtype) -> Callable[[QuantizedLinear, torch.Tensor], torch.Tensor]:
    name = f"int4pack_{'bf16' if dtype == torch.bfloat16 else 'fp32'}"

    def call(m: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        packed, scales_and_zeros = m.prepared(name)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, m.group_size, scales_and_zeros)
    return call


def _int8pack(dtype: torch.dtype) -> Callable[[QuantizedLinear, torch.Tensor], torch.Tensor]:
    name = f"int8pack_{'bf16' if dtype == torch.bfloat16 else 'fp32'}"

    def call(m: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        scales = m.prepared(name)
        return torch.ops.aten._weight_int8pack_mm(x.to(dtype), m.qweight, scales)
    return call


def _dequantized(m: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return F.linear(x, m.dequantize().to(dtype))


KERNEL_CALLS: dict[str, Callable[[QuantizedLinear, torch.Tensor], torch.Tensor]] = {
    "int4pack_bf16": _int4pack(torch.bfloat16),
    "int4pack_fp32": _int4pack(torch.float32),
    "int8pack_bf16": _int8pack(torch.bfloat16),
    "int8pack_fp32": _int8pack(torch.float32),
    "dequantize": _dequantized,
}


# ----------------------------------------------------------------------------------------------
# which kernel: a race on this machine


_chosen: dict[tuple, str] = {}  # (bits, group size, rows case) -> kernel, for this process


def kernel_for(bits: int, group_size: int, rows: int, device: torch.device) -> str:
    """The kernel a layer of `bits` (and `group_size`) uses for `rows` rows on `device`: the race's
    winner on a CPU (measured once per machine), `dequantize` elsewhere or with LMFORGE_KERNELS=off.
    Called at every multiply: a few dictionary lookups."""
    if device.type != "cpu" or os.environ.get(SWITCH, "").strip().lower() in ("off", "0", "false", "no"):
        return "dequantize"
    key = (bits, group_size, rows_case(rows))
    kernel = _chosen.get(key)
    if kernel is None:
        kernel = _chosen[key] = verdict(bits, group_size, rows)["kernel"]
    return kernel


def verdict(bits: int, group_size: int | None, rows: int, tiny: bool = False) -> dict[str, Any]:
    """{"kernel": the fastest, "ms": each candidate's best time} for `bits` at `rows` rows, raced on
    GPT-2 block shapes once per machine (`tiny`: tiny shapes, not cached; for tests)."""
    case = rows_case(rows)
    group = group_size if bits == 4 else None
    run = lambda: race(bits, group or 128, RACE_ROWS[case], tiny)  # noqa: E731
    key = f"quantized/int{bits}" + (f"-g{group}" if group else "") + f"/{case}"
    ms = run() if tiny else perf.measured(key, run)
    ms = {k: v for k, v in ms.items() if k in runnable(bits)}
    return {"kernel": min(ms, key=ms.get) if ms else "dequantize", "case": key, "ms": ms}


def runnable(bits: int) -> list[str]:
    """The kernels for `bits` that this PyTorch build has."""
    ops = {"int4pack": "_weight_int4pack_mm_for_cpu", "int8pack": "_weight_int8pack_mm"}
    return [k for k in KERNELS[bits] if k == "dequantize" or hasattr(torch.ops.aten, ops[k.rsplit("_", 1)[0]])]


@torch.no_grad()
def race(bits: int, group_size: int, rows: int, tiny: bool = False) -> dict[str, float]:
    """Best times in ms of each kernel for `bits` over the layers of one GPT-2 block at `rows` rows."""
    shapes = [(64, 96), (128, 64)] if tiny else RACE_SHAPES
    g = torch.Generator().manual_seed(0)
    layers = [QuantizedLinear.from_weight(torch.randn(d_out, d_in, generator=g) * 0.02, None, bits,
                                          min(group_size, d_in)) for d_in, d_out in shapes]
    inputs = {d_in: torch.randn(rows, d_in, generator=g) for d_in, _ in shapes}

    def candidate(kernel: str) -> Callable[[], None]:
        def run() -> None:
            for layer, (d_in, _) in zip(layers, shapes):
                KERNEL_CALLS[kernel](layer, inputs[d_in])
        return run

    working = {}
    for kernel in runnable(bits):
        try:
            candidate(kernel)()
        except (RuntimeError, NotImplementedError):  # not built for this CPU
            continue
        working[kernel] = candidate(kernel)
    return perf.race(working, seconds=0.05 if tiny else 0.4)


# ----------------------------------------------------------------------------------------------
# a model's layers


def quantize_layers(model: nn.Module, spec: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Replace each linear layer that `spec["layers"]` names ({name: bits}) by an empty QuantizedLinear of
    `spec["group_size"]` (for loading a quantized checkpoint's state dict into)."""
    for name, bits in spec["layers"].items():
        old = model.get_submodule(name)
        model.set_submodule(name, QuantizedLinear(old.in_features, old.out_features, bits, spec.get("group_size"),
                                                  old.bias is not None, device=device))


@torch.no_grad()
def dequantize_layers(model: nn.Module) -> None:
    """Replace every QuantizedLinear of `model` by an nn.Linear holding the weight it stands for (fp32), for
    training or exporting a quantized model; the model's `quantization` record goes."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                               device=module.qweight.device)
            linear.weight.copy_(module.dequantize())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            model.set_submodule(name, linear)
    if hasattr(model, "quantization"):
        del model.quantization
