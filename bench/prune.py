"""Pruning measured on SmolLM2-135M-Instruct: held-out quality by method and pattern, and what structured
pruning buys in speed and a short recovery buys back.

    python bench/prune.py                   # about 35 minutes on 2 cores
    python bench/prune.py --quick           # fewer held-out tokens, a few recovery steps (a smoke run)
    python bench/prune.py --recover-steps 200   # a longer recovery (8.6 s a step here)

Rows: the dense model; magnitude and Wanda masks at 25% and 50% unstructured sparsity and 2:4; structured
pruning (Wanda-style contributions: heads, MLP neurons) of 25% and 50% of the blocks' parameters, before
and after `--recover-steps` of full fine-tuning on kjv's training verses (batch 8 x 256 tokens, lr 1e-4:
lmforge prune --recover-steps). Calibration: 32 x 256 tokens of kjv's training verses (the Wanda paper
used 128 x 2048 of C4).

Quality: perplexity and bits per byte on the first 400 verses of kjv's test split and 24,000 characters
of the Shakespeare test play (bench/common.py `held_out`). Speed: greedy tokens/s from a 32-token prompt,
100 new tokens, batch 1 and 8, best of 2 rounds, for the dense and the structured models (masked models
are dense: their speed is the dense model's).

The anchor (Sun et al. 2023, Wanda, WikiText-2 perplexity at 50% unstructured sparsity): LLaMA-7B dense
5.68, magnitude 17.29, SparseGPT 7.22, Wanda 7.26; LLaMA-2-7B dense 5.12, magnitude 14.89, Wanda 6.42,
Wanda 2:4 11.02. The question: does Wanda stay far ahead of magnitude at 135M parameters, and does
2:4 stay much costlier than unstructured?

One JSON line per figure; a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, greedy_tokens_per_s, held_out_quality, machine_state, smollm2_fp32  # noqa: E402

CALIB = "kjv"


def cache() -> Path:
    from lmforge.perf import cache_dir

    path = cache_dir() / "bench" / "prune"
    path.mkdir(parents=True, exist_ok=True)
    return path


def variants(quick: bool, recover_steps: int) -> dict[str, dict]:
    """{row name: lmforge.prune's arguments}; the dense model has none."""
    rows: dict[str, dict] = {"dense": {}}
    for sparsity in (0.25, 0.5):
        for method in ("magnitude", "wanda"):
            rows[f"{method} {sparsity:.0%}"] = dict(method=method, sparsity=sparsity)
    for method in ("magnitude", "wanda"):
        rows[f"{method} 2:4"] = dict(method=method, pattern="2:4")
    for sparsity in (0.25, 0.5):
        rows[f"structured {sparsity:.0%}"] = dict(pattern="structured", sparsity=sparsity)
        rows[f"structured {sparsity:.0%} + {recover_steps} steps"] = dict(
            pattern="structured", sparsity=sparsity, recover_steps=recover_steps,
            overrides={"train.batch_size": 8, "train.lr": 1e-4, "train.eval_interval": recover_steps})
    return rows


def main() -> None:
    import torch

    import lmforge

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recover-steps", type=int, default=None, help="recovery steps (default 50; --quick 4)")
    parser.add_argument("--only", help="measure only the rows whose name contains this")
    args = parser.parse_args()
    steps = args.recover_steps or (4 if args.quick else 50)
    emit(machine_state())
    dense = smollm2_fp32()
    rows = []
    for name, settings in variants(args.quick, steps).items():
        if args.only and args.only not in name and name != "dense":
            continue
        path = dense
        record: dict = {"figure": "pruned", "row": name}
        if settings:
            path = cache() / ("quick-" * args.quick + name.replace(" ", "-").replace("%", "").replace(":", "of"))
            if not path.exists():
                start = time.perf_counter()
                lmforge.prune(dense, path, calib=CALIB, **settings)
                record["prune_seconds"] = round(time.perf_counter() - start, 1)
        model = lmforge.load(path)
        record["parameters"] = model.num_parameters()
        record["nonzero"] = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        record.update(held_out_quality(model, args.quick))
        if not settings.get("pattern", "").endswith(":4") and "%" not in name or "structured" in name \
                or name == "dense":
            if "steps" not in name:  # a recovered model runs as fast as the one it was recovered from
                for batch in (1, 8):
                    record[f"tokens_per_s_b{batch}"] = greedy_tokens_per_s(model, batch, 30 if args.quick else 100)
        emit(record)
        rows.append(record)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    dense = rows[0]
    print("\n| model | parameters | nonzero | kjv ppl | kjv bits/byte | shakespeare ppl | bits/byte | tok/s b1 | b8 |"
          " x dense b1 | b8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k, s = r["kjv test"], r["shakespeare held-out"]
        speed = [r.get(f"tokens_per_s_b{b}", "") for b in (1, 8)]
        ratio = [round(r[f"tokens_per_s_b{b}"] / dense[f"tokens_per_s_b{b}"], 2) if f"tokens_per_s_b{b}" in r
                 and f"tokens_per_s_b{b}" in dense else "" for b in (1, 8)]
        print(f"| {r['row']} | {r['parameters'] / 1e6:.1f}M | {r['nonzero'] / 1e6:.1f}M | {k['perplexity']} | "
              f"{k['bits_per_byte']} | {s['perplexity']} | {s['bits_per_byte']} | {speed[0]} | {speed[1]} | "
              f"{ratio[0]} | {ratio[1]} |")


if __name__ == "__main__":
    main()
