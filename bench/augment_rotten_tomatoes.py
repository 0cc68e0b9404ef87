"""Does EDA augmentation help with scarce data? rotten_tomatoes with 500 training examples, with and without.

    python bench/augment_rotten_tomatoes.py --out runs/rt-augment --seeds 0 1 2 3 4           # TF-IDF + LR
    python bench/augment_rotten_tomatoes.py --out runs/rt-augment-lm --model runs/smollm2-native --seeds 0 1 2

For each seed: a different random 500 of the train split; without augmentation the classifier sees the
500 texts; with it, the 500 texts plus `--n-aug` EDA variants of each (`lmforge.data.augment.Augmenter`,
all four operations at rate 0.1, seeded). Same budget: TF-IDF + logistic regression is fit to
convergence either way; an LM classifier (`--model`, LoRA on its last blocks) takes the same number
of optimizer steps either way. Scored on the test split (or its first `--test-size` texts).
Prints one JSON line per run and the mean and spread; writes OUT/augment.json and OUT/augment.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.data.augment import Augmenter, augment_records
from lmforge.eval.metrics import classification_scores
from lmforge.recipes.classify import train_classifier
from lmforge.tasks.classify import predict, tfidf_baseline


def load_split(split: str) -> list[dict]:
    import lmforge.data

    return list(lmforge.data.load("rotten_tomatoes", split))


def run_once(train: list[dict], test: list[dict], model: str | None, steps: int, out: Path,
             val: list[dict]) -> float:
    """Test accuracy of one classifier trained on `train`."""
    texts, gold = [r["text"] for r in test], [r["label"] for r in test]
    if model is None:
        predictions = tfidf_baseline([r["text"] for r in train], [r["label"] for r in train], texts)
    else:
        train_classifier(model, train, out, method="lora", epochs=None, val_data=val, max_length=64,
                         lora_layers=10, overrides={"train.max_steps": steps, "train.batch_size": 16,
                                                    "train.lr": 1e-3, "train.eval_interval": steps})
        predictions = predict(out, texts)
    return classification_scores([p["label"] for p in predictions], gold)["accuracy"]


def plot(results: dict[str, list[float]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    names = list(results)
    for i, name in enumerate(names):
        ax.scatter([i] * len(results[name]), results[name], color="tab:gray", zorder=3)
        ax.errorbar(i, statistics.mean(results[name]), yerr=statistics.stdev(results[name]), fmt="o",
                    color="tab:blue", capsize=8, markersize=9, zorder=4)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/rt-augment")
    parser.add_argument("--model", help="an LM to train a LoRA classifier on (default: TF-IDF + LR)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-aug", type=int, default=4, help="EDA variants per training text")
    parser.add_argument("--rate", type=float, default=0.1, help="rate of each EDA operation")
    parser.add_argument("--steps", type=int, default=90, help="optimizer steps of an LM run (batch 16)")
    parser.add_argument("--test-size", type=int, help="score only the first N test texts")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool, test = load_split("train"), load_split("test")[:args.test_size]
    val = load_split("validation")[:100]  # the same held-out texts for every LM run (never augmented)
    results: dict[str, list[float]] = {"no augmentation": [], f"EDA x{args.n_aug}": []}
    for seed in args.seeds:
        picks = np.random.default_rng(seed).choice(len(pool), size=args.n_train, replace=False)
        small = [pool[i] for i in picks]
        augmenter = Augmenter(args.rate, args.rate, args.rate, args.rate, seed=seed)
        for name, train in (("no augmentation", small),
                            (f"EDA x{args.n_aug}", augment_records(small, "text", args.n_aug, augmenter))):
            start = time.perf_counter()
            accuracy = run_once(train, test, args.model, args.steps, out / f"seed{seed}-{name.split()[0].lower()}",
                                val)
            results[name].append(accuracy)
            print(json.dumps({"figure": "run", "system": args.model or "tfidf+lr", "augmentation": name, "seed": seed,
                              "train_texts": len(train), "test_accuracy": round(accuracy, 4),
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    summary = {name: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                      "min": min(v), "max": max(v), "runs": v} for name, v in results.items()}
    for name, s in summary.items():
        print(json.dumps({"figure": "summary", "system": args.model or "tfidf+lr", "augmentation": name,
                          "mean": round(s["mean"], 4), "std": round(s["std"], 4), "seeds": len(args.seeds)}))
    (out / "augment.json").write_text(json.dumps({"settings": vars(args), "test_n": len(test), **summary}, indent=2))
    if len(args.seeds) > 1:
        plot(results, out / "augment.png", f"rotten_tomatoes, {args.n_train} training texts, "
                                           f"{args.model or 'TF-IDF + LR'}, {len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
