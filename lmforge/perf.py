"""Hardware limits, for reporting model FLOP utilisation (MFU) honestly.

`matmul_peak(dtype)` measures the FLOP/s of large square matmuls on this machine (the best of a
few runs) and caches the figure per device, dtype and thread count in the lmforge cache, so the
trainer can show MFU without paying the measurement on every run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def _cache_file() -> Path:
    root = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
    return root / "matmul_peak.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{torch.get_num_threads()}threads"


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of (size x size) @ (size x size) matmuls in `dtype`, best of repeated timings."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    for _ in range(2):
        a @ b  # warm up
    while time.perf_counter() < deadline or best == 0.0:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    """The measured matmul peak in FLOP/s, from the cache when this machine measured it before."""
    device = torch.device(device)
    key = f"{_device_name(device)}/{str(dtype).removeprefix('torch.')}"
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure_matmul_peak(dtype, device)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached, indent=2))
        except OSError:
            pass
    return cached[key]
