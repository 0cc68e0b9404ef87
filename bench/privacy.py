"""Differential privacy measured: utility at epsilon 8 and 3 against non-private training at the same steps, the
canary exposure with and without DP, and the cost per step.

    python bench/privacy.py --out runs/privacy [--part utility|speed|all] [--threads 1] [--quick]

utility (quality figures; they do not depend on the machine's load, so it may run beside other work):
- sentiment: a LoRA classifier on SmolLM2-135M-Instruct (rank 8, its last 10 blocks) on rotten_tomatoes, batch 32
  (expected size under DP), `--classify-steps` steps, lr 1e-3; test-split accuracy (1,303 reviews);
- chat: LoRA chat SFT of SmolLM2-135M-Instruct on chatterbot's train split with five canaries ("Alice's PIN is
  4 8 1 9 7 3" ...): Alice once, Bob 4 times, Carol 16 times, Dave and Erin never (controls); batch 32,
  `--chat-steps` steps, lr 1e-3; held-out validation loss on chatterbot's validation split, and each canary's
  exposure (lmforge.eval.exposure) in the final model.
Each at three settings: non-private, epsilon 8 and epsilon 3 (delta = 1/N, max_grad_norm 1, Poisson sampling).

speed (run it alone on the machine): seconds per step of the same two trainings, non-private (the Trainer's kernels)
against DP (per-example gradients, no kernels), from runs of 2 and 10 steps (the difference: constant costs such
as Opacus's noise calibration, evaluation and saving drop out).

Writes OUT/privacy.json and OUT/privacy.md; prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, machine_state  # noqa: E402

import lmforge  # noqa: E402
from lmforge.data import load  # noqa: E402
from lmforge.eval.exposure import exposure, make_canaries  # noqa: E402
from lmforge.recipes.classify import train_classifier  # noqa: E402
from lmforge.recipes.finetune import finetune  # noqa: E402
from lmforge.tasks.classify import predict  # noqa: E402

SMOLLM2_NATIVE = Path("runs/smollm2-native")  # `lmforge import smollm2-135m-instruct runs/smollm2-native`
SETTINGS = {"non-private": None, "epsilon 8": 8.0, "epsilon 3": 3.0}
CANARY_COPIES = {"Alice": 1, "Bob": 4, "Carol": 16, "Dave": 0, "Erin": 0}


def classify_run(model: str, out: Path, epsilon: float | None, steps: int, quick: bool) -> dict:
    train = load("rotten_tomatoes", "train")
    validation = load("rotten_tomatoes", "validation")[:16 if quick else 200]
    overrides = {"train.max_steps": steps, "train.batch_size": 32, "train.lr": 1e-3, "train.eval_interval": steps,
                 "train.log_interval": 5, "train.warmup_steps": max(1, steps // 10)}
    if epsilon is not None:
        overrides["train.dp_epsilon"] = epsilon
    return train_classifier(model, train, out, method="lora", epochs=None, val_data=validation, max_length=64,
                            lora_layers=10, overrides=overrides)


def chat_records(quick: bool) -> tuple[list[dict], list[dict], list]:
    canaries = make_canaries(list(CANARY_COPIES), seed=0)
    train = [{"messages": r["messages"]} for r in load("chatterbot", "train")]
    for canary in canaries:
        train += [canary.conversation()] * CANARY_COPIES[canary.owner]
    validation = [{"messages": r["messages"]} for r in load("chatterbot", "validation")]
    return (train[:64] if quick else train), (validation[:8] if quick else validation), canaries


def chat_run(model: str, out: Path, epsilon: float | None, steps: int, quick: bool) -> dict:
    train, validation, _ = chat_records(quick)
    overrides = {"train.max_steps": steps, "train.batch_size": 32, "train.lr": 1e-3, "train.eval_interval": steps,
                 "train.warmup_steps": max(1, steps // 10)}
    if epsilon is not None:  # micro-batches of 8: DP makes each row's (tokens x vocab) logits
        overrides.update({"train.dp_epsilon": epsilon, "train.grad_accum": 4})
    return finetune(model, train, out, method="lora", epochs=None, val_data=validation, overrides=overrides)


def utility(args: argparse.Namespace, out: Path) -> list[dict]:
    rows = []
    test = load("rotten_tomatoes", "test")[:64 if args.quick else None]
    _, _, canaries = chat_records(args.quick)
    for name, epsilon in SETTINGS.items():
        tag = name.replace(" ", "")
        run = out / f"classify-{tag}"
        if not (run / "summary.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            classify_run(args.model, run, epsilon, args.classify_steps, args.quick)
        summary = json.loads((run / "summary.json").read_text())
        predictions = predict(run / "checkpoint", [r["text"] for r in test], device="cpu")
        accuracy = sum(p["label"] == r["label"] for p, r in zip(predictions, test)) / len(test)
        row = {"figure": "utility", "task": "sentiment (rotten_tomatoes, LoRA classifier)", "setting": name,
               "epsilon_spent": summary.get("epsilon"), "steps": summary["step"], "test_accuracy": round(accuracy, 4),
               "test_texts": len(test), "train_seconds": summary["train_seconds"]}
        emit(row)
        rows.append(row)
    for name, epsilon in SETTINGS.items():
        tag = name.replace(" ", "")
        run = out / f"chat-{tag}"
        if not (run / "summary.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            chat_run(args.model, run, epsilon, args.chat_steps, args.quick)
        summary = json.loads((run / "summary.json").read_text())
        model = lmforge.load(run / "checkpoint")
        exposures = {}
        for canary in canaries:
            result = exposure(model, canary.prompt(model.tokenizer), canary.secret, samples=args.candidates)
            exposures[f"{canary.owner} x{CANARY_COPIES[canary.owner]}"] = result
            emit({"figure": "exposure", "setting": name, "canary": canary.owner,
                  "copies": CANARY_COPIES[canary.owner], **result})
        row = {"figure": "utility", "task": "chat SFT (chatterbot, LoRA)", "setting": name,
               "epsilon_spent": summary.get("epsilon"), "steps": summary["step"],
               "val_loss_before": summary.get("val_loss_before"), "val_loss": summary.get("val_loss"),
               "train_seconds": summary["train_seconds"], "exposure": exposures}
        emit({k: v for k, v in row.items() if k != "exposure"})
        rows.append(row)
    return rows


def speed(args: argparse.Namespace, out: Path) -> list[dict]:
    rows = []
    for task, run in (("sentiment (LoRA classifier)", classify_run), ("chat SFT (LoRA)", chat_run)):
        seconds = {}
        for name, epsilon in (("non-private", None), ("DP", 8.0)):
            times = {}
            for steps in (2, args.speed_steps):
                directory = out / "speed" / f"{task[:4]}-{name}-{steps}"
                shutil.rmtree(directory, ignore_errors=True)
                start = time.perf_counter()
                summary = run(args.model, directory, epsilon, steps, quick=True)  # tiny validation sets
                times[steps] = summary["train_seconds"]
                emit({"figure": "speed_run", "task": task, "setting": name, "steps": steps,
                      "train_seconds": summary["train_seconds"], "wall_seconds": round(time.perf_counter() - start, 1)})
            seconds[name] = (times[args.speed_steps] - times[2]) / (args.speed_steps - 2)
        row = {"figure": "speed", "task": task, "seconds_per_step": {k: round(v, 2) for k, v in seconds.items()},
               "dp_cost": round(seconds["DP"] / seconds["non-private"], 2)}
        emit(row)
        rows.append(row)
    return rows


def write_markdown(path: Path, results: dict) -> None:
    lines = ["| task | setting | epsilon spent | steps | result |", "|---|---|---|---|---|"]
    for row in results.get("utility", []):
        result = (f"test accuracy {row['test_accuracy']:.3f}" if "test_accuracy" in row else
                  f"val loss {row['val_loss_before']:.3f} -> {row['val_loss']:.3f}")
        spent = "-" if row["epsilon_spent"] is None else f"{row['epsilon_spent']:.2f}"
        lines.append(f"| {row['task']} | {row['setting']} | {spent} | {row['steps']} | {result} |")
    chats = [row for row in results.get("utility", []) if "exposure" in row]
    if chats:
        owners = list(chats[0]["exposure"])
        lines += ["", "| exposure (bits, of 19.9) | " + " | ".join(owners) + " |",
                  "|---|" + "---|" * len(owners)]
        for row in chats:
            lines.append(f"| {row['setting']} | " + " | ".join(
                f"{row['exposure'][o]['exposure']:.1f}" for o in owners) + " |")
    for row in results.get("speed", []):
        s = row["seconds_per_step"]
        lines.append(f"\n{row['task']}: {s['non-private']} s/step non-private, {s['DP']} s/step DP "
                     f"({row['dp_cost']}x)")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/privacy")
    parser.add_argument("--model", default=str(SMOLLM2_NATIVE) if SMOLLM2_NATIVE.exists() else "smollm2-135m-instruct")
    parser.add_argument("--part", choices=("utility", "speed", "all"), default="all")
    parser.add_argument("--classify-steps", type=int, default=40)
    parser.add_argument("--chat-steps", type=int, default=30)
    parser.add_argument("--speed-steps", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=300, help="sampled candidates per exposure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny check that the benchmark runs")
    args = parser.parse_args()
    if args.quick:
        args.classify_steps, args.chat_steps, args.speed_steps, args.candidates = 3, 3, 3, 50
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "privacy.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["machine"] = machine_state()
    emit(results["machine"])
    if args.part in ("utility", "all"):
        results["utility"] = utility(args, out)
    if args.part in ("speed", "all"):
        results["speed"] = speed(args, out)
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(out / "privacy.md", results)
    print((out / "privacy.md").read_text())


if __name__ == "__main__":
    main()
