"""What this machine can do, measured once and remembered: matmul peaks, memory bandwidth, and races
between two ways of doing one job (for `lmforge.kernels` to choose by).

    perf.matmul_peak(torch.bfloat16)        # FLOP/s of large matmuls in bf16 (for MFU, `auto` precision)
    perf.memory_bandwidth()                 # bytes/s of a large copy
    perf.race({"plain": f, "packed": g})    # the best time of each, in ms, interleaved so drift hits both
    perf.measured("key", measure)           # measure() once per machine, then from the cache
    perf.machine()                          # the machine the measurements belong to
    perf.forget()                           # measure everything again at next use

Measurements are cached in `$LMFORGE_CACHE/machine/<machine id>.json` (default ~/.cache/lmforge), one
file per machine: CPU model, cores, PyTorch's thread count and version. A change of any of them (another
CPU, `OMP_NUM_THREADS`, a torch upgrade) measures again; `remeasure=True` (or `lmforge env --remeasure`)
forces it (`forget()` drops them all). A measurement that other processes disturbed is used once
and not cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def cache_dir() -> Path:
    """Where downloads and caches go: `$LMFORGE_CACHE` if set, else `~/.cache/lmforge`."""
    env = os.environ.get("LMFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmforge"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what `platform` says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):  # x86; Arm boards
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """The facts a measurement belongs to: a change of any of them means measuring again."""
    return {"cpu": cpu_model(), "cores": cores(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "arch": platform.machine()}


def machine_id() -> str:
    facts = machine()
    slug = "".join(c if c.isalnum() else "-" for c in facts["cpu"].lower()).strip("-")[:40]
    return f"{slug}-{hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:10]}"


def _cache_file() -> Path:
    return cache_dir() / "machine" / f"{machine_id()}.json"


def read_cache() -> dict[str, Any]:
    """Everything measured on this machine so far: {"machine": facts, "measured": {key: value}}."""
    try:
        cached = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict) or not isinstance(cached.get("measured"), dict):
        cached = {}
    return {"machine": machine(), "measured": cached.get("measured", {})}


def forget() -> None:
    """Drop what was measured on this machine: the next use measures again."""
    _cache_file().unlink(missing_ok=True)
    known.clear()


def _busy_ticks() -> int | None:
    """Busy CPU ticks of the whole machine, time stolen by the hypervisor included (Linux)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return user + nice + system + irq + softirq + steal


def _process_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


class OtherLoad:
    """How many cores other processes kept busy while a measurement ran (0 where /proc is missing).

        with OtherLoad([worker_pid]) as load:
            measure()
        if load.cores > 0.2: ...  # disturbed: measure again
    """

    def __init__(self, pids: list[int] | None = None):
        self.pids = [os.getpid(), *(pids or [])]
        self.cores = 0.0

    def __enter__(self) -> OtherLoad:
        self.busy, self.ours = _busy_ticks(), sum(_process_ticks(p) for p in self.pids)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = _busy_ticks()
        if busy is None or self.busy is None:
            return
        ours = sum(_process_ticks(p) for p in self.pids)
        ticks = os.sysconf("SC_CLK_TCK")
        self.cores = max(0.0, (busy - self.busy) - (ours - self.ours)) / ticks / (time.perf_counter() - self.start)


MAX_OTHER_CORES = 0.25  # a measurement during which other processes kept more cores busy is not cached
known: dict[tuple[Path, str], Any] = {}  # (cache file, key) -> the value this process read or measured
disturbed: dict[str, float] = {}  # key -> cores other processes kept busy while it was measured: not cached


def measured(key: str, measure: Callable[[], Any], remeasure: bool = False) -> Any:
    """`measure()` (a JSON value), run once per machine and then read from the cache; within a process,
    from memory after the first use. A measurement that other processes disturbed (they kept more than
    MAX_OTHER_CORES cores busy meanwhile) holds for this process only (`disturbed` names it): the next
    process measures again."""
    where = (_cache_file(), key)
    if where in known and not remeasure:
        return known[where]
    cached = read_cache()
    if remeasure or key not in cached["measured"]:
        with OtherLoad() as load:
            value = measure()
        if load.cores > MAX_OTHER_CORES:
            disturbed[key] = round(load.cores, 2)
        else:
            disturbed.pop(key, None)
            _write(key, value)
    else:
        value = cached["measured"][key]
    known[where] = value
    return value


def _write(key: str, value: Any) -> None:
    cached = read_cache()  # another process may have written meanwhile
    cached["measured"][key] = value
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache: measured again next time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(candidates: dict[str, Callable[[], Any]], seconds: float = 0.5, device: torch.device | str = "cpu",
         min_rounds: int = 3) -> dict[str, float]:
    """The best time of each candidate in milliseconds. One warm-up call each, then rounds that call
    every candidate once, in turn, until `seconds` have passed (at least `min_rounds`), so that a
    change of clock or load during the race falls on all of them alike."""
    device = torch.device(device)
    for run in candidates.values():
        run()
    best = dict.fromkeys(candidates, float("inf"))
    deadline, rounds = time.perf_counter() + seconds, 0
    while rounds < min_rounds or time.perf_counter() < deadline:
        for name, run in candidates.items():
            _sync(device)
            t = time.perf_counter()
            run()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
        rounds += 1
    return best


def measure_matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", size: int = 2048,
                        seconds: float = 1.0) -> float:
    """FLOP/s of (size x size) @ (size x size) matmuls in `dtype`, best of repeated timings."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    ms = race({"matmul": lambda: a @ b}, seconds, device)["matmul"]
    return 2 * size**3 / (ms / 1e3)


def _device_key(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", remeasure: bool = False) -> float:
    """The measured matmul peak in FLOP/s (once per machine, then from the cache)."""
    device = torch.device(device)
    key = f"matmul_peak/{_device_key(device)}/{str(dtype).removeprefix('torch.')}"
    return measured(key, lambda: measure_matmul_peak(dtype, device), remeasure)


def memory_bandwidth(device: torch.device | str = "cpu", remeasure: bool = False, size_mb: int = 256) -> float:
    """Bytes/s of copying a `size_mb` MB tensor (each byte read once and written once), best of a few."""
    device = torch.device(device)

    def measure() -> float:
        src = torch.ones(size_mb * 2**20 // 4, device=device)
        dst = torch.empty_like(src)
        ms = race({"copy": lambda: dst.copy_(src)}, 0.5, device)["copy"]
        return 2 * src.nbytes / (ms / 1e3)

    return measured(f"memory_bandwidth/{_device_key(device)}", measure, remeasure)
