"""What this machine's CPU and PyTorch build offer, for `lmforge.kernels` to choose from.

    from lmforge.kernels import cpu
    cpu.has_amx(), cpu.mkl_packing(), cpu.onednn_packing(), cpu.onednn_bf16_packing(), cpu.available_memory()
    cpu.facts()          # all of them as a dict (part of `lmforge.kernels.report`)

The only module of lmforge that asks PyTorch's private corners (`torch.cpu._is_amx_tile_supported`,
`torch.ops.mkl`, `torch.ops.mkldnn`); each question is guarded, so a build without them answers False.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def has_amx() -> bool:
    """True where the CPU has AMX tiles: there PyTorch's bf16 matmuls are the fast ones."""
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(is_supported and is_supported())
    except RuntimeError:
        return False


@functools.cache
def mkl_packing() -> bool:
    """True where fp32 weights can be packed once for MKL's sgemm (`torch.ops.mkl._mkl_linear`)."""
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def onednn_packing() -> bool:
    """True where fp32 weights can be packed for oneDNN (`torch.ops.mkldnn._linear_pointwise`)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def onednn_bf16_packing() -> bool:
    """True where bf16 weights can be packed for oneDNN and the CPU has bf16 instructions."""
    try:
        return onednn_packing() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


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


def facts() -> dict[str, Any]:
    """What the kernels' rules read, as a dict."""
    return {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "amx": has_amx(),
            "mkl_packing": mkl_packing(), "onednn_packing": onednn_packing(),
            "onednn_bf16_packing": onednn_bf16_packing(),
            "cuda": torch.cuda.is_available()}
