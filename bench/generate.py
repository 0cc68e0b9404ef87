"""Greedy generation with the KV cache: lmforge against Hugging Face transformers' `generate`.

    python bench/generate.py            # fp32 and bf16, batch 1 and 8, 3 rounds each (several minutes)
    python bench/generate.py --quick    # 1 round each
    python bench/generate.py --no-packing-side   # also lmforge with its kernels off (what packing gives)

The GPT-2 124M shape (preset "gpt2": 12 layers, 12 heads, width 768, vocab 50257, context 1024) with
random weights, the same weights on both sides (checked in fp32: logits agree to 1e-4), first in fp32,
then with both models cast to bf16. Each row is a 32-token prompt; each side generates exactly 200
new tokens, greedily: lmforge's `generate_ids` (temperature 0) and transformers'
`GPT2LMHeadModel.generate` (use_cache=True, do_sample=False, min_new_tokens = max_new_tokens = 200).
lmforge packs the weights once per call (the kernels of `lmforge.kernels.generating`: MKL's sgemm for
fp32 at batch 2 and more, oneDNN for bf16; each record says which it used). Both run in this process, in alternating
rounds (A B A B ...); a round that other processes disturbed is run again. The greedy outputs are
compared token for token.

Prints one JSON line per figure: tokens/s of each side (the median over rounds) with
`ratio_vs_transformers`, and the agreement of the outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    JEMALLOC,
    JEMALLOC_CONF,
    add_disturbance_arguments,
    add_generation_arguments,
    emit,
    hf_gpt2,
    machine_state,
    max_logit_difference,
    measure_quietly,
    median,
    timed,
)

from lmforge import kernels  # noqa: E402
from lmforge.config import preset  # noqa: E402
from lmforge.infer.generate import generate_ids  # noqa: E402
from lmforge.models.decoder import Decoder  # noqa: E402

PRESET, PROMPT_LEN = "gpt2", 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of positions where the two outputs agree, and where the first disagreement is (per row)."""
    same = total = 0
    first = []
    for row_a, row_b in zip(a, b):
        same += sum(x == y for x, y in zip(row_a, row_b))
        total += max(len(row_a), len(row_b))
        first.append(next((i for i, (x, y) in enumerate(zip(row_a, row_b)) if x != y), None))
    return {"agreement": same / total, "first_disagreement": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_generation_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    add_disturbance_arguments(parser, budget=180)
    parser.add_argument("--jemalloc", action="store_true", help="run under jemalloc (where installed)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="weight dtypes, each measured on both sides (bf16: both models cast to bf16)")
    parser.add_argument("--no-packing-side", action="store_true",
                        help="also time lmforge with its kernels (weight packing) turned off")
    args = parser.parse_args()
    if args.jemalloc and "jemalloc" not in os.environ.get("LD_PRELOAD", "") and Path(JEMALLOC).is_file():
        env = dict(os.environ, LD_PRELOAD=JEMALLOC, MALLOC_CONF=JEMALLOC_CONF)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    rounds = args.rounds or (1 if args.quick else 3)
    deadline = time.perf_counter() + args.budget  # no retries of disturbed rounds after this
    n = args.new_tokens

    torch.set_num_threads(args.threads)
    emit(machine_state())
    torch.manual_seed(0)
    model = Decoder(preset(PRESET)).eval()
    hf = hf_gpt2(model).eval()
    generator = torch.Generator().manual_seed(1)
    check = torch.randint(0, model.config.vocab_size, (2, 64), generator=generator)
    diff = max_logit_difference(model, hf, check)
    emit({"figure": "parity", "max_abs_logit_difference": diff, "ok": diff <= 1e-4})
    if diff > 1e-4:
        raise SystemExit("lmforge and transformers disagree on the same weights: the benchmark would be meaningless")

    prompts = {batch: torch.randint(0, model.config.vocab_size, (batch, PROMPT_LEN), generator=generator)
               for batch in args.batch}
    for dtype in args.dtypes:
        model.to(DTYPES[dtype])
        hf.to(DTYPES[dtype])
        for batch in args.batch:
            measure_batch(model, hf, prompts[batch], n, rounds, args.retries, deadline, args.no_packing_side, dtype)


def measure_batch(model: Decoder, hf, prompts: torch.Tensor, n: int, rounds: int, retries: int,
                  deadline: float, no_packing_side: bool, dtype: str) -> None:
    """Time both sides on the same prompts in alternating rounds; emit tokens/s, the ratio and the agreement."""
    batch = prompts.shape[0]
    outputs: dict[str, list[list[int]]] = {}

    def ours(new_tokens: int = n) -> None:
        outputs["lmforge"] = generate_ids(model, prompts.tolist(), max_new_tokens=new_tokens, temperature=0)

    @torch.inference_mode()
    def theirs(new_tokens: int = n) -> None:
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        outputs["transformers"] = out[:, PROMPT_LEN:].tolist()

    def ours_unpacked(new_tokens: int = n) -> None:
        outputs["lmforge_no_packing"] = generate_ids(model, prompts.tolist(), max_new_tokens=new_tokens,
                                                     temperature=0, use_kernels=False)

    sides = {"lmforge": ours, "transformers": theirs}
    if no_packing_side:
        sides["lmforge_no_packing"] = ours_unpacked
    for fn in sides.values():  # warm up
        fn(8)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    disturbed = 0
    for _ in range(rounds):
        for name, fn in sides.items():
            s, noisy = measure_quietly(lambda fn=fn: timed(fn), [], retries=retries, deadline=deadline)
            seconds[name].append(s)
            disturbed += noisy
    tok_s = {name: batch * n / median(s) for name, s in seconds.items()}
    for name in sides:
        record = {"figure": "generate_tokens_per_s", "side": name, "dtype": dtype, "batch": batch,
                  "prompt_tokens": PROMPT_LEN,
                  "new_tokens": n, "tokens_per_s": round(tok_s[name], 1),
                  "rounds_tokens_per_s": [round(batch * n / s, 1) for s in seconds[name]],
                  "rounds_disturbed_by_other_processes": disturbed}
        if name == "lmforge":
            with kernels.generating(model, rows=batch) as chosen:
                record["kernels"] = sorted(chosen["applied"]) or chosen["skipped"]
        if name != "transformers":
            record["ratio_vs_transformers"] = round(tok_s[name] / tok_s["transformers"], 3)
        emit(record)
    emit({"figure": "generate_greedy_agreement", "dtype": dtype, "batch": batch,
          **agreement(outputs["lmforge"], outputs["transformers"])})
    if no_packing_side:
        emit({"figure": "generate_greedy_agreement_packed_vs_not", "dtype": dtype, "batch": batch,
              **agreement(outputs["lmforge"], outputs["lmforge_no_packing"])})


if __name__ == "__main__":
    main()
