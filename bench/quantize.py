"""Weight-only quantization measured: size, quality and greedy tokens/s per format, and llama.cpp beside it.

    python bench/quantize.py                  # SmolLM2-135M-Instruct and the GPT-2 124M shape (~20 minutes)
    python bench/quantize.py --quick          # fewer held-out tokens, fewer new tokens
    python bench/quantize.py --own runs/kjv   # also a model lmforge pretrained itself (weights on no grid)
    python bench/quantize.py --no-llama-cpp   # skip the llama.cpp anchor

Formats: fp32, bf16 (the fp32 checkpoint cast), int8 (RTN, per channel), int4 RTN and GPTQ at group 32 and
128 (64 for SmolLM2, whose width of 576 is not a multiple of 128; GPTQ calibrated on 32 x 256 tokens
of kjv's training verses), and the SmolLM2 GGUF imported with its
own Q4_1 codes (`lmforge import`, int8 head). Unless the head is the subject, it is int8.

Quality: perplexity and bits per byte on held-out text: the first 400 verses of kjv's test split and the
first 24,000 characters of the Shakespeare test play (As You Like It), scored in windows of the
model's context (`lmforge.train.objectives.evaluate_tokens`). Mind that SmolLM2's weights come from a
Q4_1 GGUF: they sit on a group-32 4-bit grid already, so int4 at group 32 reproduces them almost
exactly and says nothing about int4's cost; group 64 (two of its groups under one scale) and `--own` do.

Speed: greedy tokens/s of `generate_ids` from a 32-token prompt, 200 new tokens (`--quick`: 50), at
batch 1 and 8, best of 2 rounds, each format in its own process (so its peak memory, `ru_maxrss`, is
its own), the kernels chosen by lmforge's race on this machine (named in each record).

llama.cpp: `llama-cpp-python` (PyPI) is built into its own virtual environment under
$LMFORGE_CACHE/bench/llama-cpp (about 10 minutes the first time; skipped with a message where the
build fails), then runs the SmolLM2 GGUF (Q4_1 as shipped, and requantized by llama.cpp itself to
Q8_0 and Q4_0) greedily from the same 32 tokens for the same new tokens with the same thread count.

One JSON line per figure; a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT, emit, greedy_tokens_per_s, held_out_quality, machine_state  # noqa: E402

HERE = Path(__file__).resolve()


def cache() -> Path:
    from lmforge.perf import cache_dir

    path = cache_dir() / "bench" / "quantize"
    path.mkdir(parents=True, exist_ok=True)
    return path


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20, 1)


# ----------------------------------------------------------------------------------------------
# the checkpoints


def make_checkpoints(own: str | None) -> dict[str, tuple[Path, str]]:
    """{format name: (checkpoint, dtype)}, made once under the cache."""
    import lmforge
    from lmforge.config import preset
    from lmforge.models.decoder import Decoder
    from lmforge.train.checkpoint import save_checkpoint

    root = cache()
    out: dict[str, tuple[Path, str]] = {}

    def once(path: Path, make) -> Path:
        if not (path / "config.json").is_file():
            start = time.perf_counter()
            make(path)
            emit({"figure": "made", "checkpoint": path.name, "seconds": round(time.perf_counter() - start, 1)})
        return path

    families = {"smollm2": once(root / "smollm2-fp32", lambda p: lmforge.import_model(
        "smollm2-135m-instruct", p, dequantize=True))}
    if own:
        from lmforge.train.checkpoint import resolve_checkpoint

        families["own"] = resolve_checkpoint(own)
    for family, base in families.items():
        out[f"{family} fp32"] = (base, "fp32")
        out[f"{family} bf16"] = (base, "bf16")
        out[f"{family} int8"] = (once(root / f"{family}-int8", lambda p, b=base: lmforge.quantize(b, p, bits=8)),
                                 "fp32")
        width = json.loads((base / "config.json").read_text())["d_model"]
        for group in (32, 128 if width % 128 == 0 else 64):  # SmolLM2's 576 = 4.5 x 128: group 64 there
            for method in ("rtn", "gptq"):
                calib = {"calib": "kjv"} if method == "gptq" else {}
                out[f"{family} int4 {method} g{group}"] = (once(
                    root / f"{family}-int4-{method}-g{group}",
                    lambda p, b=base, g=group, m=method, c=calib: lmforge.quantize(b, p, bits=4, group_size=g,
                                                                                   method=m, **c)), "fp32")
    out["smollm2 int4 gptq g32, int4 head"] = (once(root / "smollm2-int4-gptq-g32-head4", lambda p: lmforge.quantize(
        families["smollm2"], p, bits=4, group_size=32, method="gptq", calib="kjv", head_bits=4)), "fp32")
    out["smollm2 gguf q4_1"] = (once(root / "smollm2-gguf", lambda p: lmforge.import_model(
        "smollm2-135m-instruct", p)), "fp32")

    def gpt2(path: Path) -> None:
        torch.manual_seed(0)
        save_checkpoint(path, Decoder(preset("gpt2")))

    base = once(root / "gpt2-fp32", gpt2)
    out["gpt2 fp32"], out["gpt2 bf16"] = (base, "fp32"), (base, "bf16")
    out["gpt2 int8"] = (once(root / "gpt2-int8", lambda p: lmforge.quantize(base, p, bits=8)), "fp32")
    out["gpt2 int4 rtn g32"] = (once(root / "gpt2-int4-g32", lambda p: lmforge.quantize(base, p, bits=4)), "fp32")
    return out


# ----------------------------------------------------------------------------------------------
# one format, in its own process


def measure_one(checkpoint: str, dtype: str, quick: bool, quality: bool) -> dict:

    import lmforge
    from lmforge.kernels.quantized import QuantizedLinear, kernel_for

    model = lmforge.load(checkpoint, dtype=torch.bfloat16 if dtype == "bf16" else None)
    record: dict = {"size_mb": dir_mb(Path(checkpoint)) if dtype == "fp32" else None}
    layer = next((m for m in model.modules() if isinstance(m, QuantizedLinear)), None)
    if layer is not None:
        record["kernels"] = {rows: kernel_for(layer.bits, layer.group_size, rows, torch.device("cpu"))
                             for rows in (1, 8, 128)}
    if quality and model.tokenizer is not None:
        record.update(held_out_quality(model, quick))
    for batch in (1, 8):
        record[f"tokens_per_s_b{batch}"] = greedy_tokens_per_s(model, batch, 50 if quick else 200)
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)
    return record


# ----------------------------------------------------------------------------------------------
# llama.cpp


LLAMA_SCRIPT = r"""
import json, sys, time
import llama_cpp
from llama_cpp import Llama
source, work, threads, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prompt = json.loads(sys.argv[5])
files = {"Q4_1": source}
for name, kind in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
    out = f"{work}/smollm2-{name}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = kind, True, threads
    llama_cpp.llama_model_quantize(source.encode(), out.encode(), params)
    files[name] = out
for name, path in files.items():
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    best = 0.0
    for _ in range(2):
        llm.reset()
        start = time.perf_counter(); made = 0
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            made += 1
            if made == new:
                break
        best = max(best, made / (time.perf_counter() - start))
    print(json.dumps({"format": name, "tokens_per_s_b1": round(best, 1)}), flush=True)
"""


def llama_cpp_figures(threads: int, new: int) -> list[dict]:
    from lmforge.interop import catalog_model_file

    root = cache().parent / "llama-cpp"
    python = root / "venv" / "bin" / "python"
    if not python.is_file():
        print("building llama-cpp-python into its own venv (about 10 minutes, once)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
        built = subprocess.run([str(root / "venv" / "bin" / "pip"), "install", "-q", "llama-cpp-python"])
        if built.returncode:
            print("llama-cpp-python did not build: no llama.cpp figures", file=sys.stderr)
            return []
    source = catalog_model_file("smollm2-135m-instruct")
    run = subprocess.run([str(python), "-c", LLAMA_SCRIPT, str(source), str(root), str(threads), str(new),
                          json.dumps(PROMPT)], capture_output=True, text=True)
    if run.returncode:
        print(f"llama.cpp failed: {run.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return []
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--own", help="a float checkpoint lmforge pretrained (also measured, with its quantizations)")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--only", help="measure only the formats whose name contains this")
    parser.add_argument("--measure", nargs=2, metavar=("CHECKPOINT", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--no-quality", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_one(*args.measure, args.quick, not args.no_quality)))
        return
    emit(machine_state())
    rows = []
    for name, (checkpoint, dtype) in make_checkpoints(args.own).items():
        if args.only and args.only not in name:
            continue
        command = [sys.executable, str(HERE), "--measure", str(checkpoint), dtype]
        command += ["--quick"] * args.quick + ["--no-quality"] * name.startswith("gpt2")
        run = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
        if run.returncode:
            print(f"{name}: failed: {run.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        record = {"figure": "quantized", "format": name, **json.loads(run.stdout.strip().splitlines()[-1])}
        emit(record)
        rows.append(record)
    for family in ("smollm2", "gpt2", "own"):
        fp32 = next((r for r in rows if r["format"] == f"{family} fp32"), None)
        for r in rows:
            if fp32 and r["format"].startswith(family + " "):
                for b in (1, 8):
                    r[f"x_fp32_b{b}"] = round(r[f"tokens_per_s_b{b}"] / fp32[f"tokens_per_s_b{b}"], 2)
    llama = [] if args.no_llama_cpp else llama_cpp_figures(torch.get_num_threads(), 50 if args.quick else 200)
    for figure in llama:
        emit({"figure": "llama.cpp", **figure})
    print_table(rows, llama)


def print_table(rows: list[dict], llama: list[dict]) -> None:
    q4 = next((f["tokens_per_s_b1"] for f in llama if f["format"] == "Q4_0"), None)
    print("\n| format | MB | kjv ppl | kjv bits/byte | shakespeare ppl | bits/byte | tok/s b1 | b8 | x fp32 b1 | b8 |"
          " x llama.cpp Q4_0 b1 | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k, s = r.get("kjv test", {}), r.get("shakespeare held-out", {})
        print(f"| {r['format']} | {r['size_mb'] or ''} | {k.get('perplexity', '')} | {k.get('bits_per_byte', '')} | "
              f"{s.get('perplexity', '')} | {s.get('bits_per_byte', '')} | {r['tokens_per_s_b1']} | "
              f"{r['tokens_per_s_b8']} | {r.get('x_fp32_b1', '')} | {r.get('x_fp32_b8', '')} | "
              f"{round(r['tokens_per_s_b1'] / q4, 2) if q4 and r['format'].startswith('smollm2') else ''} | "
              f"{r['peak_rss_mb']:.0f} |")
    for f in llama:
        print(f"| llama.cpp {f['format']} | | | | | | {f['tokens_per_s_b1']} | | | | | |")


if __name__ == "__main__":
    main()
