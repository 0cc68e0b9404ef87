"""Greedy generation on onnxruntime (fp32 and dynamic int8) against lmforge's own torch path.

    python bench/onnx_runtime.py                    # GPT-2 124M shape and SmolLM2-135M, batch 1 and 8, 3 rounds
    python bench/onnx_runtime.py --quick            # 1 round each
    python bench/onnx_runtime.py --models tiny --new-tokens 8 --quick    # a check that it runs (seconds)

Models: the GPT-2 124M shape (preset "gpt2") with random weights, and SmolLM2-135M-Instruct
(`lmforge.load("smollm2-135m-instruct")`, a catalog model: real weights, Llama style with grouped-query
attention). Each is exported once with `lmforge.infer.onnx.export_onnx` (fp32; the export time is a
figure) and quantized to int8 from that graph (`quantize_export`: onnxruntime's `quantize_dynamic`).
Before timing, the fp32 graph's logits are checked against torch's (a left-padded batch, prefill and
one decode step; within 1e-3).

Each row is a 32-token prompt (random ids); each side generates exactly 200 new tokens greedily
through the same loop (`generate_ids`, temperature 0): lmforge's torch path (fp32, with its own
generation kernels: `lmforge.kernels.generating`), onnxruntime fp32 and onnxruntime int8 (CPU
provider, intra-op threads = torch.get_num_threads()). The sides run in alternating rounds in this
process; a round that other processes disturbed is run again. Prints one JSON line per figure:
tokens/s (the median over rounds) with `ratio_vs_lmforge_torch`, and how far each engine's greedy
tokens agree with torch's.

Reference (onnxruntime's published GPT-2 CPU figures): its fp32 graph with past state at about
1.7-1.9x PyTorch, its dynamic int8 at roughly twice that again. Those compare against Hugging Face's
PyTorch GPT-2; lmforge's torch path is faster than that (bench/generate.py), so the ratios here may
be lower.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_disturbance_arguments,
    add_generation_arguments,
    emit,
    machine_state,
    measure_quietly,
    median,
    timed,
)

from lmforge.config import preset  # noqa: E402
from lmforge.infer import left_pad  # noqa: E402
from lmforge.infer.generate import generate_ids  # noqa: E402
from lmforge.infer.onnx import export_onnx, load_onnx, quantize_export  # noqa: E402
from lmforge.models.decoder import Decoder  # noqa: E402

PROMPT_LEN = 32
TOLERANCE = 1e-3  # fp32 logits: SmolLM2's 30 layers of real weights differ from torch by ~1e-4 of rounding
MODELS = {"gpt2": "GPT-2 124M shape, random weights", "smollm2": "SmolLM2-135M-Instruct (catalog)",
          "tiny": "preset tiny, random weights (a check that the benchmark runs)"}


def build(name: str) -> Decoder:
    if name == "smollm2":
        import lmforge

        return lmforge.load("smollm2-135m-instruct").float().eval()
    torch.manual_seed(0)
    return Decoder(preset("gpt2" if name == "gpt2" else "tiny")).eval()


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of positions where two greedy outputs agree, and where each row first disagrees."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))
    first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]
    return {"agreement": round(same / max(total, 1), 4), "first_disagreement": first}


@torch.no_grad()
def parity(model: Decoder, engine, vocab: int) -> float:
    """Largest |logit difference| over a left-padded prefill and one decode step (real positions only)."""
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (12, 5, 9)]
    tokens, pad = left_pad(prompts, "cpu")
    ours, theirs = model.new_cache(3, 32, pad), engine.new_cache(3, 32, pad)
    real = torch.arange(tokens.shape[1])[None] >= pad[:, None]
    diff = (model(tokens, cache=ours) - engine(tokens, cache=theirs)).abs()[real].max().item()
    step = torch.randint(0, vocab, (3, 1), generator=generator)
    return max(diff, (model(step, cache=ours) - engine(step, cache=theirs)).abs().max().item())


def measure_model(name: str, args: argparse.Namespace, rounds: int, deadline: float, work: Path) -> None:
    model = build(name)
    vocab = model.config.vocab_size
    start = time.perf_counter()
    fp32_dir = export_onnx(model, work / f"{name}-fp32")
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    int8_dir = quantize_export(fp32_dir, work / f"{name}-int8")
    sizes = {d: sum(f.stat().st_size for f in p.iterdir()) for d, p in (("fp32", fp32_dir), ("int8", int8_dir))}
    emit({"figure": "onnx_export", "model": name, "what": MODELS[name], "export_s": round(export_s, 1),
          "quantize_s": round(time.perf_counter() - start, 1),
          "fp32_mb": round(sizes["fp32"] / 2**20, 1), "int8_mb": round(sizes["int8"] / 2**20, 1)})
    threads = torch.get_num_threads()
    engines = {"onnxruntime_fp32": load_onnx(fp32_dir, threads), "onnxruntime_int8": load_onnx(int8_dir, threads)}
    diff = parity(model, engines["onnxruntime_fp32"], vocab)
    emit({"figure": "onnx_parity", "model": name, "max_abs_logit_difference_fp32": diff, "ok": diff <= TOLERANCE})
    if diff > TOLERANCE:
        raise SystemExit(f"{name}: the fp32 graph disagrees with torch: the benchmark would be meaningless")
    generator = torch.Generator().manual_seed(1)
    for batch in args.batch:
        prompts = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=generator).tolist()
        measure_batch(name, {"lmforge_torch": model, **engines}, prompts, args, rounds, deadline)


def measure_batch(name: str, sides: dict, prompts: list[list[int]], args: argparse.Namespace, rounds: int,
                  deadline: float) -> None:
    """Time every side on the same prompts in alternating rounds; emit tokens/s, the ratio and the agreement."""
    batch, n = len(prompts), args.new_tokens
    outputs: dict[str, list[list[int]]] = {}

    def run(side: str, new_tokens: int = n) -> None:
        outputs[side] = generate_ids(sides[side], prompts, max_new_tokens=new_tokens, temperature=0)

    for side in sides:  # warm up
        run(side, 8)
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    disturbed = 0
    for _ in range(rounds):
        for side in sides:
            s, noisy = measure_quietly(lambda side=side: timed(lambda: run(side)), [], retries=args.retries,
                                       deadline=deadline)
            seconds[side].append(s)
            disturbed += noisy
    tok_s = {side: batch * n / median(s) for side, s in seconds.items()}
    for side in sides:
        record = {"figure": "generate_tokens_per_s", "model": name, "side": side, "batch": batch,
                  "prompt_tokens": PROMPT_LEN, "new_tokens": n, "tokens_per_s": round(tok_s[side], 1),
                  "rounds_tokens_per_s": [round(batch * n / s, 1) for s in seconds[side]],
                  "ratio_vs_lmforge_torch": round(tok_s[side] / tok_s["lmforge_torch"], 3),
                  "rounds_disturbed_by_other_processes": disturbed}
        if side != "lmforge_torch":
            record["greedy_vs_torch"] = agreement(outputs[side], outputs["lmforge_torch"])
        emit(record)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_generation_arguments(parser)
    parser.add_argument("--models", nargs="+", default=["gpt2", "smollm2"], choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2, help="torch's threads, and onnxruntime's intra-op threads")
    add_disturbance_arguments(parser, budget=600)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    deadline = time.perf_counter() + args.budget
    torch.set_num_threads(args.threads)
    emit({**machine_state(), "onnxruntime": _version("onnxruntime")})
    with tempfile.TemporaryDirectory(prefix="lmforge-onnx-bench-") as work:
        for name in args.models:
            measure_model(name, args, rounds, deadline, Path(work))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    main()
