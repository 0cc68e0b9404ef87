"""Training throughput of lmforge against Hugging Face transformers, on the same config and weights.

    python bench/train_throughput.py            # the full run (a few minutes)
    python bench/train_throughput.py --quick    # fewer rounds, no compiled pair (about a minute)
    python bench/train_throughput.py --no-kernels-side   # also lmforge with LMFORGE_KERNELS=off (what they give)

One training step = forward + backward + grad clip (1.0) + AdamW, batch 8 x 256 tokens of preset
"gpt-mini" (6 layers, 6 heads, width 384, vocab 8192, dropout 0), 2 CPU threads. Each side runs as
its user would: lmforge through its `Trainer` (`precision="bf16"`: bf16 weights, fp32 master copies),
transformers' `GPT2LMHeadModel` (SDPA attention) under `torch.autocast("cpu", torch.bfloat16)` with
`torch.optim.AdamW` defaults and the loss from `labels=`. Pairs measured: bf16 eager (the headline),
fp32 eager (plus lmforge `precision="auto"`), and bf16 under `torch.compile` on both sides.

lmforge's Trainer applies its hardware kernels (`lmforge.kernels`: on a CPU without AMX, bf16 linear
layers, attention and the loss head multiplied in fp32); each lmforge record lists those it used.
Each side lives in its own worker process (so its peak RSS is its own); the parent runs the sides'
steps in alternating rounds (A B A B ...) so a busy machine slows both alike, and reports medians
and the ratio of medians. Before timing, the weight map is checked: lmforge and transformers logits
agree to 1e-4 in fp32, and so does the first step's loss. Model FLOP/s (`flops_per_token`) is
reported as a share of the measured bf16 and fp32 matmul peaks. With jemalloc installed
(Debian `libjemalloc2`) the bf16 pair is also measured with both sides under jemalloc.

Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    JEMALLOC,
    JEMALLOC_CONF,
    WorkerProcess,
    emit,
    gpt2_config,
    hf_gpt2,
    load_hf_weights,
    machine_state,
    max_logit_difference,
    measure_quietly,
    median,
)

from lmforge.config import TrainConfig, preset  # noqa: E402
from lmforge.models.decoder import Decoder, flops_per_token  # noqa: E402
from lmforge.perf import measure_matmul_peak  # noqa: E402

PRESET, BATCH = "gpt-mini", 8


def batch_for(step: int, config) -> dict[str, torch.Tensor]:
    """The batch of a step: random tokens, the same on both sides. The last target of each row is
    ignored so that lmforge's loss counts exactly the tokens transformers' shifted `labels=` loss does."""
    rng = np.random.default_rng([1234, step])
    window = torch.from_numpy(rng.integers(0, config.vocab_size, (BATCH, config.block_size + 1)))
    ids, targets = window[:, :-1].contiguous(), window[:, 1:].clone()
    targets[:, -1] = -100
    return {"ids": ids, "targets": targets}


# ------------------------------------------------------------------------------------------------
# worker: one side, in its own process; reads commands on stdin, answers one JSON line each


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(side: str, precision: str, compiled: bool, weights: str, threads: int) -> None:
    import transformers  # noqa: F401  (both sides import the same modules before the RSS baseline)

    import lmforge.train.trainer  # noqa: F401  (likewise)

    torch.set_num_threads(threads)
    config = preset(PRESET)
    baseline_mb = current_rss_mb()
    state = torch.load(weights, weights_only=True)
    step_counter = [0]
    torch.manual_seed(0)
    train_step, resolved, chosen = make_step(side, precision, compiled, state, config)

    def step() -> float:
        return train_step(step_counter[0])

    def run(n: int) -> dict:
        seconds, losses = [], []
        for _ in range(n):
            start = time.perf_counter()
            losses.append(step())
            seconds.append(time.perf_counter() - start)
            step_counter[0] += 1
        return {"seconds": seconds, "losses": losses}

    first = run(1)  # the first step (compiles, makes AdamW state)
    run(1)  # and one more to warm up
    print(json.dumps({"ready": True, "first_loss": first["losses"][0], "first_seconds": first["seconds"][0],
                      "precision": resolved, "kernels": chosen}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "run":
            print(json.dumps(run(command["steps"])), flush=True)
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({"peak_rss_mb": peak_mb, "baseline_rss_mb": baseline_mb}), flush=True)
            return


def make_step(side: str, precision: str, compiled: bool, state: dict[str, torch.Tensor], config,
              device: str = "cpu") -> tuple[Callable[[int], float], str, list[str] | None]:
    """One side's training step on `device` as its user would run it (see the module docstring): returns
    step(step_number) -> loss, the precision it resolved to and, for lmforge, the kernels its Trainer applied.

    lmforge: its Trainer (`precision`, `compile`, `device`: bf16 weights with fp32 master copies, fused AdamW);
    transformers: GPT2LMHeadModel under autocast in `precision`, torch.optim.AdamW (fused on CUDA)."""
    if side == "lmforge":
        from lmforge.train.trainer import Trainer

        model = Decoder(config)
        model.load_state_dict(state)
        train_config = TrainConfig(batch_size=BATCH, precision=precision, compile=compiled, max_steps=10**6,
                                   device=device)
        trainer = Trainer(model, train_config, out=tempfile.mkdtemp(prefix="lmforge-bench-"),
                          batches=lambda step, part, rows: batch_for(step, config))

        def lmforge_step(number: int) -> float:
            trainer.step = number
            return trainer.train_step()

        return lmforge_step, trainer.precision, sorted(trainer.kernels["applied"]) or trainer.kernels["skipped"]
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(gpt2_config(config))
    load_hf_weights(hf, state, config)
    hf.to(device).train()
    optimizer = torch.optim.AdamW(hf.parameters(), fused=torch.device(device).type == "cuda" or None)
    forward = torch.compile(hf) if compiled else hf
    autocast = precision == "bf16"

    def transformers_step(number: int) -> float:
        ids = batch_for(number, config)["ids"].to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return transformers_step, precision, None


class Worker(WorkerProcess):
    """The parent's handle on one worker process (one configuration)."""

    def __init__(self, name: str, side: str, precision: str, compiled: bool, weights: str, threads: int,
                 jemalloc: bool):
        env = dict(os.environ)
        if name.endswith("_no_kernels"):
            env["LMFORGE_KERNELS"] = "off"
        if jemalloc:
            env["LD_PRELOAD"] = JEMALLOC
            env["MALLOC_CONF"] = JEMALLOC_CONF
        argv = [sys.executable, __file__, "--worker", side, "--precision", precision, "--weights", weights,
                "--threads", str(threads)] + (["--compile"] if compiled else [])
        super().__init__(name, argv, env)
        self.seconds: list[float] = []


def measure_pair(label: str, sides: dict[str, tuple[str, str, bool]], weights: str, args, jemalloc: bool,
                 peaks: dict[str, float], reference: str = "transformers") -> None:
    """Start the workers (they warm up at the same time), time them in alternating rounds, emit the figures."""
    workers = {name: Worker(name, side, precision, compiled, weights, args.threads, jemalloc)
               for name, (side, precision, compiled) in sides.items()}
    ready = {name: w.read() for name, w in workers.items()}
    disturbed = 0
    for _ in range(args.rounds):
        for w in workers.values():
            seconds, noisy = measure_quietly(lambda w=w: median(w.send(op="run", steps=args.steps)["seconds"]),
                                             [w.process.pid], retries=args.retries, deadline=args.deadline)
            w.seconds.append(seconds)
            disturbed += noisy
    memory = {name: w.close() for name, w in workers.items()}

    config = preset(PRESET)
    tokens = BATCH * config.block_size
    flops = flops_per_token(config, config.block_size)
    allocator = "jemalloc" if jemalloc else "system"
    tok_s = {name: tokens / median(w.seconds) for name, w in workers.items()}
    for name, w in workers.items():
        record = {
            "figure": "train_tokens_per_s", "pair": label, "side": name, "precision": ready[name]["precision"],
            "compiled": sides[name][2], "allocator": allocator, "tokens_per_s": round(tok_s[name], 1),
            "rounds_tokens_per_s": [round(tokens / s, 1) for s in w.seconds],
            "mfu_vs_bf16_peak": round(tok_s[name] * flops / peaks["bf16"], 3),
            "mfu_vs_fp32_peak": round(tok_s[name] * flops / peaks["fp32"], 3),
            "first_step_loss": round(ready[name]["first_loss"], 5),
            "first_step_seconds": round(ready[name]["first_seconds"], 1),
            "rounds_disturbed_by_other_processes": disturbed,
        }
        if ready[name]["kernels"] is not None:  # lmforge's sides: the kernels the Trainer applied
            record["kernels"] = ready[name]["kernels"]
        if name != reference and reference in workers:
            record["ratio_vs_transformers"] = round(tok_s[name] / tok_s[reference], 3)
        emit(record)
    growth = {name: m["peak_rss_mb"] - m["baseline_rss_mb"] for name, m in memory.items()}
    for name in workers:
        if name == reference:
            continue
        emit({"figure": "train_peak_memory", "pair": label, "side": name, "allocator": allocator,
              "peak_rss_growth_mb": round(growth[name], 1),
              "transformers_peak_rss_growth_mb": round(growth[reference], 1),
              "ratio_vs_transformers": round(growth[name] / growth[reference], 3), "limit": 1.2})


def check_parity(weights: str) -> None:
    """The weight map is right: logits agree to 1e-4 in fp32 (and losses, with the same ignored target)."""
    config = preset(PRESET)
    model = Decoder(config)
    model.load_state_dict(torch.load(weights, weights_only=True))
    hf = hf_gpt2(model)
    batch = batch_for(0, config)
    diff = max_logit_difference(model, hf, batch["ids"][:2])
    with torch.no_grad():
        ours = model(batch["ids"], batch["targets"]).item()
        theirs = hf(input_ids=batch["ids"], labels=batch["ids"]).loss.item()
    ok = diff <= 1e-4 and abs(ours - theirs) <= 1e-4
    emit({"figure": "parity", "max_abs_logit_difference": diff, "loss_lmforge": round(ours, 6),
          "loss_transformers": round(theirs, 6), "ok": ok})
    if not ok:
        raise SystemExit("lmforge and transformers disagree on the same weights: the benchmark would be meaningless")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 step, no compiled pair")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per pair")
    parser.add_argument("--steps", type=int, default=None, help="steps per side per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retries", type=int, default=3,
                        help="times a measurement is repeated while other processes keep the CPUs busy")
    parser.add_argument("--budget", type=float, default=200,
                        help="seconds after which disturbed measurements are no longer repeated")
    parser.add_argument("--pairs", default="bf16,fp32,bf16_compiled",
                        help="comma-separated pairs to measure: bf16, fp32, bf16_compiled (--quick drops the last)")
    parser.add_argument("--no-kernels-side", action="store_true",
                        help="also run lmforge with its kernels off (LMFORGE_KERNELS=off) in the bf16 and fp32 pairs")
    parser.add_argument("--allocator", choices=("system", "jemalloc", "both"), default="both",
                        help="allocator(s) for the bf16 pair (jemalloc only where installed)")
    parser.add_argument("--worker", choices=("lmforge", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.precision, args.compile, args.weights, args.threads)
        return
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.steps = args.steps or (1 if args.quick else 2)
    args.deadline = time.perf_counter() + args.budget  # no retries of disturbed rounds after this

    torch.set_num_threads(args.threads)
    emit(machine_state())
    peaks = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        # best of 3 one-second measurements: a single one was seen at half the usual bf16 peak
        peaks[name], noisy = measure_quietly(
            lambda dtype=dtype: max(measure_matmul_peak(dtype, torch.device("cpu")) for _ in range(3)), [],
            retries=args.retries, deadline=args.deadline, best=max)
        emit({"figure": "matmul_peak", "dtype": name, "gflop_per_s": round(peaks[name] / 1e9, 1),
              "threads": args.threads, "disturbed_by_other_processes": noisy})
    emit({"figure": "model", "preset": PRESET, "batch": BATCH, "flops_per_token": flops_per_token(preset(PRESET))})

    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        weights = str(Path(tmp) / "weights.pt")
        torch.manual_seed(0)
        torch.save(Decoder(preset(PRESET)).state_dict(), weights)
        check_parity(weights)

        allocators = {"system": [False], "jemalloc": [True], "both": [False, True]}[args.allocator]
        if not Path(JEMALLOC).is_file():
            allocators = [False]
        pairs = args.pairs.split(",")
        no_kernels = {"lmforge_no_kernels": ("lmforge", "bf16", False)} if args.no_kernels_side else {}
        for jemalloc in allocators if "bf16" in pairs else []:
            measure_pair("bf16", {"lmforge": ("lmforge", "bf16", False), **no_kernels,
                                  "transformers": ("transformers", "bf16", False)}, weights, args, jemalloc, peaks)
        if "fp32" in pairs:
            no_kernels = {"lmforge_no_kernels": ("lmforge", "fp32", False)} if args.no_kernels_side else {}
            measure_pair("fp32", {"lmforge": ("lmforge", "fp32", False), "lmforge_auto": ("lmforge", "auto", False),
                                  **no_kernels, "transformers": ("transformers", "fp32", False)},
                         weights, args, False, peaks)
        if "bf16_compiled" in pairs and not args.quick:
            measure_pair("bf16_compiled", {"lmforge": ("lmforge", "bf16", True),
                                           "transformers": ("transformers", "bf16", True)},
                         weights, args, False, peaks)


if __name__ == "__main__":
    main()
