"""Language GANs measured as "Language GANs Falling Short" (Caccia et al. 2018) asks: over a temperature sweep.

    python bench/gan.py                      # pretrain (MLE) + GAN + sweep: ~10-12 minutes at 2 threads
    python bench/gan.py --quick              # a tiny version of the same, ~1-2 minutes: checks that it runs
    python bench/gan.py --generator runs/x   # skip pretraining: GAN-train and sweep from this MLE generator

1. Lines: every line of at least 4 words (not all capitals) of the Shakespeare plays in the catalog's train
   split (`lmforge.recipes.gan.read_lines`); held out: the lines of its validation plays.
2. MLE: a tokenizer (2,048 tokens) and token shards of the training lines, one document (ending in eos)
   per line (`lmforge prepare`, no cleaning), and a GPT-2 style decoder (4 layers, d_model 192, 4 heads,
   context 48; 2.6M parameters) pretrained on them with maximum likelihood (`lmforge pretrain`, 600 steps
   of 32 windows: about one pass over the lines).
3. GAN: `lmforge gan train` from that generator (per-prefix rewards, 1 discriminator step per generator
   step after 20 discriminator-only steps, MLE weight 0.5, 300 steps of 16 lines and 16 samples).
4. For both models, at temperatures 0.5 .. 1.5: --samples lines sampled from the start token; quality =
   BLEU-4 of each sample against all held-out lines (Texygen style, `lmforge.eval.metrics.reference_bleu`;
   higher is better), diversity = self-BLEU-4 among the samples (lower is more diverse) and distinct-2/3
   of their words; repeated samples; and each model's held-out bits per byte on the held-out lines.
   Mode collapse is flagged as in training (under half the distinct-2 of as many real lines, or over a
   quarter of the samples repeated).
5. Which curve dominates: over the self-BLEU range both curves span, the BLEU-4 of each (linearly
   interpolated between temperatures) is compared; "the curves coincide" when they differ by less than
   the noise floor everywhere (the largest gap between the MLE curve and the same model's curve from
   another seed's samples, at least 0.2 BLEU-4 points), "MLE dominates" when MLE's quality is at least
   the GAN's at every diversity level, "the GAN dominates" the other way round, else "the curves cross".

Writes OUT/gan.json (everything), OUT/gan.md (the table and the verdict), OUT/gan.png (the quality-diversity
curves) and prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_state  # noqa: E402

TEMPERATURES = (0.5, 0.7, 0.85, 1.0, 1.2, 1.5)
TIE = 0.2  # BLEU-4 points: smaller differences between the curves are called a tie (or the noise floor, if larger)


def pretrain_generator(out: Path, train_lines: list[str], steps: int) -> Path:
    import lmforge
    from lmforge.data import Document

    docs = [Document(f"line{i}", line) for i, line in enumerate(train_lines)]
    lmforge.prepare(docs, out / "data", vocab_size=2048, val_fraction=0.02, clean=False)
    lmforge.pretrain(out / "data", out / "mle", preset="gpt-micro", overrides={
        "model.block_size": 48, "model.d_model": 192, "model.n_head": 4, "model.d_ff": 768,
        "train.max_steps": steps, "train.batch_size": 32, "train.lr": 2e-3,
        "train.min_lr": 1e-4, "train.warmup_steps": max(1, steps // 20), "train.eval_interval": max(steps // 4, 1),
        "train.eval_batches": 4, "train.precision": "fp32"})
    return out / "mle"


def sweep(checkpoint: Path, heldout: list[str], n_samples: int, max_tokens: int, seed: int) -> dict:
    import lmforge
    from lmforge.eval.metrics import NgramReferences, self_bleu
    from lmforge.recipes.gan import heldout_bits, sample_scores
    from lmforge.train.adversarial import as_sequence, sample_sequences, texts_of

    model = lmforge.load(checkpoint).eval()
    tokenizer, eos = model.tokenizer, model.tokenizer.eos_id
    rows = [as_sequence(ids, eos, max_tokens) for ids in tokenizer.encode_batch(heldout)]
    result = {"bits": heldout_bits(model, rows, heldout, eos, 64), "points": []}
    references = NgramReferences(heldout)
    for temperature in TEMPERATURES:
        samples = sample_sequences(model, n_samples, eos, max_tokens, temperature=temperature, seed=seed)
        texts = texts_of(tokenizer, samples)
        scored = [t for t in texts if t] or ["<empty>"]
        point = {"temperature": temperature,
                 "bleu4": sum(references.bleu(t) for t in scored) / len(scored),
                 "self_bleu4": self_bleu(scored) if len(scored) > 1 else 100.0,
                 **sample_scores(texts, heldout), "examples": texts[:3]}
        result["points"].append(point)
    return result


def dominance(mle: list[dict], gan: list[dict], tie: float = TIE) -> tuple[str, dict]:
    """Compare BLEU-4 at equal self-BLEU-4 over the range both curves span (linear interpolation); gaps under
    `tie` BLEU-4 points everywhere are a tie."""
    def curve(points):
        pairs = sorted((p["self_bleu4"], p["bleu4"]) for p in points)
        return [x for x, _ in pairs], [y for _, y in pairs]

    def at(xs, ys, x):
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x0 <= x <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return ys[0] if x <= xs[0] else ys[-1]

    (mx, my), (gx, gy) = curve(mle), curve(gan)
    low, high = max(mx[0], gx[0]), min(mx[-1], gx[-1])
    if low >= high:
        return "the curves do not overlap in diversity: no common self-BLEU range to compare at", {}
    grid = [low + (high - low) * i / 20 for i in range(21)]
    gaps = [at(mx, my, x) - at(gx, gy, x) for x in grid]
    detail = {"self_bleu_range": [round(low, 2), round(high, 2)], "mean_bleu_gap_mle_minus_gan": sum(gaps) / len(gaps),
              "min_gap": min(gaps), "max_gap": max(gaps)}
    if max(abs(g) for g in gaps) < tie:
        verdict = f"the curves coincide: at equal diversity their BLEU-4 differs by less than {tie:.2f} points"
    elif min(gaps) >= 0:
        verdict = "MLE dominates: at every diversity level both reach, its samples have at least the GAN's BLEU-4"
    elif max(gaps) <= 0:
        verdict = "the GAN dominates: at every diversity level both reach, its samples have at least MLE's BLEU-4"
    else:
        better = "MLE" if sum(gaps) > 0 else "the GAN"
        verdict = f"the curves cross; on average over the common diversity range {better} has the higher BLEU-4"
    return verdict, detail


def plot(results: dict, png: Path) -> None:
    from lmforge.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for name, color in (("mle", "tab:blue"), ("gan", "tab:red")):
        points = results[name]["points"]
        label = f"{name.upper()} ({results[name]['bits']['val_bpb']:.3f} bits/byte held out)"
        for ax, key in zip(axes, ("self_bleu4", "distinct_3")):
            xs, ys = [p[key] for p in points], [p["bleu4"] for p in points]
            ax.plot(xs, ys, "o-", color=color, label=label)
            for p, x, y in zip(points, xs, ys):
                ax.annotate(f"T={p['temperature']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("self-BLEU-4 (lower: more diverse)")
    axes[1].set_xlabel("distinct-3 of words (higher: more diverse)")
    for ax in axes:
        ax.set_ylabel("BLEU-4 against held-out lines (higher: better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Shakespeare lines: quality against diversity over a temperature sweep (Caccia et al. 2018)")
    _save(fig, png)


def markdown(results: dict, verdict: str) -> str:
    lines = ["| model | held-out bits/byte | T | BLEU-4 | self-BLEU-4 | distinct-2 | distinct-3 | repeated "
             "| collapse |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("mle", "gan"):
        for p in results[name]["points"]:
            lines.append(f"| {name.upper()} | {results[name]['bits']['val_bpb']:.4f} | {p['temperature']:g} | "
                         f"{p['bleu4']:.2f} | {p['self_bleu4']:.2f} | {p['distinct_2']:.3f} | {p['distinct_3']:.3f} | "
                         f"{p['repeated']:.1%} | {'yes' if p['mode_collapse'] else 'no'} |")
    return "\n".join(lines) + f"\n\n**Verdict:** {verdict}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-gan")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the bench runs (~1-2 minutes)")
    parser.add_argument("--generator", help="an MLE generator to start from (skips pretraining)")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--gan-steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=300, help="samples per model and temperature")
    parser.add_argument("--heldout", type=int, default=3000, help="held-out lines (BLEU references, bits per byte)")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.gan_steps, args.samples, args.heldout = 30, 12, 40, 300
    from lmforge.recipes.gan import read_lines, train_gan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(machine_state())
    started = time.perf_counter()
    train_lines, heldout = read_lines("shakespeare", "train"), read_lines("shakespeare", "validation")
    heldout = heldout[:args.heldout]
    emit({"figure": "lines", "train": len(train_lines), "heldout": len(heldout)})
    generator = Path(args.generator) if args.generator else None
    if generator is None:
        generator = out / "mle"
        if not (generator / "checkpoint").is_dir():
            pretrain_generator(out, train_lines, args.pretrain_steps)
    emit({"figure": "pretrained", "seconds": round(time.perf_counter() - started, 1)})
    gan_run = out / "gan"
    if not (gan_run / "summary.json").is_file():
        train_gan(generator, "shakespeare", gan_run, max_tokens=32, eval_samples=64 if not args.quick else 8,
                  d_warmup=20 if not args.quick else 4,
                  overrides={"train.max_steps": args.gan_steps, "train.eval_interval": max(args.gan_steps // 5, 1),
                             "train.eval_batches": 10 if not args.quick else 2})
    summary = json.loads((gan_run / "summary.json").read_text())
    emit({"figure": "gan_trained", "seconds": round(time.perf_counter() - started, 1),
          "mode_collapse_evals": summary.get("mode_collapse_evals"), "d_accuracy": summary.get("d_accuracy")})
    torch.manual_seed(0)
    results = {}
    for name, checkpoint in (("mle", generator), ("gan", gan_run)):
        results[name] = sweep(checkpoint, heldout, args.samples, 32, seed=0)
        for p in results[name]["points"]:
            emit({"figure": "sweep", "model": name, **{k: v for k, v in p.items() if k != "examples"}})
        emit({"figure": "heldout_bits", "model": name, **results[name]["bits"]})
    # the noise floor: the MLE model's own curve drawn again from other samples (another seed)
    reseeded = sweep(generator, heldout, args.samples, 32, seed=1)
    _, noise = dominance(results["mle"]["points"], reseeded["points"], tie=0.0)
    tie = max(TIE, max(abs(noise.get("min_gap", 0.0)), abs(noise.get("max_gap", 0.0))))
    emit({"figure": "noise", "largest_bleu_gap_between_two_mle_sample_sets": tie})
    verdict, detail = dominance(results["mle"]["points"], results["gan"]["points"], tie)
    detail["tie_threshold"] = tie
    at_one = {name: next(p for p in results[name]["points"] if p["temperature"] == 1.0) for name in results}
    results.update(verdict=verdict, dominance=detail, quick=args.quick, seconds=round(time.perf_counter() - started),
                   settings={"pretrain_steps": args.pretrain_steps if not args.generator else None,
                             "gan_steps": args.gan_steps, "samples": args.samples, "heldout": len(heldout),
                             "generator": str(generator)},
                   at_temperature_1={k: {m: p[m] for m in ("bleu4", "self_bleu4")} for k, p in at_one.items()},
                   gan_summary={k: summary.get(k) for k in ("val_bpb_before", "val_bpb", "distinct_2_before",
                                                            "distinct_2", "d_accuracy", "mode_collapse_evals")})
    emit({"figure": "verdict", "verdict": verdict, **detail})
    (out / "gan.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gan.md").write_text(markdown(results, verdict))
    plot(results, out / "gan.png")
    print(markdown(results, verdict))


if __name__ == "__main__":
    main()
