"""`lmforge env`: this machine, what was measured on it, and what lmforge chooses for each job and why.

    lmforge env                  # hardware, matmul peaks, memory bandwidth, the kernel for each job
    lmforge env --remeasure      # forget this machine's measurements and race again
    lmforge env --json           # the same as one JSON object

The measurements are those the training and generation paths use (`lmforge.perf`,
`lmforge.kernels.measure`), read from the per-machine cache or measured now (about 10 s the first time).
Paste its output into a bug report about speed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from lmforge import kernels, perf
from lmforge.kernels import cpu, measure, quantized
from lmforge.train.trainer import resolve_precision

FIXED = {  # kernels chosen by a rule, not a race: they save memory, at no measured cost in speed
    "lean_norm": "rule: every model with lmforge's norm layers (memory: keeps only its input)",
    "lean_swiglu": "rule: every SwiGLU model (memory: keeps only its input)",
    "lora_dropout": "rule: peft LoRA layers with dropout (memory and speed)",
}


def env(remeasure: bool = False, json_output: bool = False) -> dict[str, Any]:
    """Show the hardware, its measured matmul peaks and memory bandwidth, and the kernel for each job.

    What lmforge's speed choices rest on: the CPU and PyTorch build, bf16/fp32 matmul peaks and memory
    bandwidth measured on this machine (cached per CPU model, core count and torch version), what
    `--train.precision auto` picks, and for each job (training in bf16, generating in fp32/bf16 at 1 and
    8 rows) which kernel races were won, with their timings. LMFORGE_KERNELS=off, or e.g.
    LMFORGE_KERNELS=packed_mkl=off,fp32_attention=on, overrides them.

    Args:
        remeasure: forget this machine's measurements and measure everything again
        json_output: print one JSON object instead of the table
    """
    if remeasure:
        perf.forget()
    report = {
        "hardware": hardware(),
        "measured": {
            "matmul_peak_gflops": {name: round(perf.matmul_peak(dtype) / 1e9, 1)
                                   for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))},
            "memory_bandwidth_gbs": round(perf.memory_bandwidth() / 1e9, 1),
        },
        "precision_auto": resolve_precision("auto", torch.device("cpu")),
        "switch": os.environ.get(measure.SWITCH, ""),
        "kernels": [verdict.__dict__ for verdict in measure.everything()] if kernels.switched_on() else [],
        "quantized": [quantized.verdict(bits, 32, rows) for bits in quantized.BITS for rows in (1, 8, 128)]
        if kernels.switched_on() else [],
        "rules": FIXED,
        "cache": str(perf.cache_dir() / "machine" / f"{perf.machine_id()}.json"),
    }
    report["disturbed"] = dict(perf.disturbed)  # measured now while other processes ran: not cached
    print(json.dumps(report, indent=2) if json_output else as_text(report))
    return report


def hardware() -> dict[str, Any]:
    """The CPU, memory, PyTorch build and accelerators."""
    facts = {**perf.machine(), **cpu.facts(), "memory_gib": round(_total_memory() / 2**30, 1),
             "memory_available_gib": round(cpu.available_memory() / 2**30, 1)}
    facts["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    facts["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return facts


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def as_text(report: dict[str, Any]) -> str:
    """The report as aligned lines for a terminal."""
    hw, measured = report["hardware"], report["measured"]
    peaks = measured["matmul_peak_gflops"]
    lines = [
        f"cpu        {hw['cpu']} ({hw['arch']}), {hw['cores']} cores, torch uses {hw['torch_threads']} threads",
        f"memory     {hw['memory_gib']} GiB, {hw['memory_available_gib']} GiB available",
        f"torch      {hw['torch']}; AMX tiles {_yes(hw['amx'])}, MKL packing {_yes(hw['mkl_packing'])}, "
        f"oneDNN bf16 {_yes(hw['onednn_bf16_packing'])}",
        f"gpus       {', '.join(hw['cuda']) or 'no CUDA device'}{'; Apple MPS' if hw['mps'] else ''}",
        f"measured   matmul bf16 {peaks['bf16']:.1f} GFLOP/s, fp32 {peaks['fp32']:.1f} GFLOP/s "
        f"(bf16 {peaks['bf16'] / peaks['fp32']:.2f}x fp32); memory copy {measured['memory_bandwidth_gbs']} GB/s",
        f"precision  --train.precision auto -> {report['precision_auto']}",
        f"cache      {report['cache']}",
        *([f"disturbed  other processes kept cores busy during {', '.join(report['disturbed'])}: "
           "used for this run, not cached"] if report["disturbed"] else []),
        "",
        f"{'job':<26}{'kernel':<16}{'used':<6}why",
    ]
    if not report["kernels"]:
        lines.append(f"{'every job':<26}{'(all)':<16}{'no':<6}switched off ({measure.SWITCH}=off)")
    for v in report["kernels"]:
        lines.append(f"{_job(v['kernel'], v['case']):<26}{v['kernel']:<16}{_yes(v['use']):<6}{v['why']}")
    for v in report["quantized"]:
        ms = ", ".join(f"{k} {t:.2f} ms" for k, t in sorted(v["ms"].items(), key=lambda kv: kv[1]))
        job = "int{} layers, {}".format(*v["case"].removeprefix("quantized/int").split("/")).replace("-g32", " (g32)")
        lines.append(f"{job:<26}{v['kernel']:<16}{'yes':<6}the fastest measured: {ms}")
    for kernel, why in report["rules"].items():
        lines.append(f"{'training, any precision':<26}{kernel:<16}{'yes':<6}{why}")
    lines.append(f"{'training':<26}{'torch.compile':<16}{'no':<6}not raced (compiling takes 30-60 s on a CPU): "
                 f"--train.compile true")
    return "\n".join(lines)


def _job(kernel: str, case: str) -> str:
    dtype = case.split(",")[0].replace("bfloat16", "bf16").replace("float32", "fp32")
    if kernel.startswith("packed"):
        return f"generating, {dtype}, {case.split(', ')[1]}"
    return f"training, {dtype}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
