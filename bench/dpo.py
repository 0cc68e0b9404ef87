"""DPO of SmolLM2-135M-Instruct with LoRA on chatterbot self-play pairs: lmforge against TRL + peft, and what it does.

    python bench/dpo.py                  # both parts (about 25 minutes on 2 idle cores)
    python bench/dpo.py --part speed     # lmforge vs TRL + peft, alternating rounds (about 6 minutes)
    python bench/dpo.py --part quality   # the 1-epoch run, before/after figures, side-by-side answers
    python bench/dpo.py --quick          # fewer pairs and steps: checks that it runs

The pairs are `lmforge dpo-pairs smollm2-135m-instruct --data chatterbot` (written once into the benchmarks'
cache): for every conversation the human's last answer is chosen and the model's own sampled answer
(temperature 0.7, at most 96 tokens) rejected; chatterbot's held-out conversations make the held-out pairs.

Speed: one optimizer step = the DPO loss (sigmoid, beta 0.1) of 8 pairs (16 sequences, prompt + answer,
right-padded) + backward + grad clip 1.0 + AdamW, fp32, 2 threads, LoRA rank 8, alpha 16, dropout 0.05 on
the attention and MLP projections, the reference log-probabilities computed before training on both sides
(TRL's `precompute_ref_log_probs=True`; lmforge always does) and not timed:
- lmforge: `DPO` recipe parts (`apply_lora`, `PreferenceLoss`) run by the Trainer's `train_step`;
- TRL 1.x + peft: `DPOTrainer` with a peft `LoraConfig` on q/k/v/o/gate/up/down, `bf16=False` (its default
  is bf16 autocast), its `compute_loss` + backward + the same clip and `torch.optim.AdamW` step.
Both get the same pairs in the same order (their token ids are checked equal, and the two references'
log-probabilities must agree to 1e-3). Rounds alternate (lmforge, TRL, TRL, lmforge, ...), each side runs
`--steps` steps a round; tokens/s counts the pairs' real tokens (prompt + answer, chosen and rejected).

Quality: `lmforge dpo smollm2-135m-instruct --data PAIRS --method lora` for one epoch (train.eval_interval 25):
held-out reward accuracy and margin, the held-out chosen (human) answers' loss per token, before and after;
bits per byte on held-out kjv and Shakespeare text (general ability); the run's tokens/s; greedy answers of
the model before and after to a few held-out prompts, next to the human's.
Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, held_out_quality, machine_state  # noqa: E402

MODEL = "smollm2-135m-instruct"
BATCH, BETA, LR, RANK, ALPHA, DROPOUT, MAX_LENGTH = 8, 0.1, 5e-5, 8, 16.0, 0.05, 512


def pairs_folder(quick: bool) -> Path:
    from lmforge.perf import cache_dir
    from lmforge.tasks.preference import make_pairs

    folder = cache_dir() / "bench" / "dpo" / ("pairs-quick" if quick else "pairs")
    if not (folder / "heldout.jsonl").is_file():
        make_pairs(MODEL, "chatterbot", folder, limit=48 if quick else None)
    return folder


# ------------------------------------------------------------------------------------------------
# speed


def lmforge_step(model, pairs, steps: int, workdir: Path):
    """lmforge's step over the first `steps` batches of `pairs` (their references computed here)."""
    from lmforge.config import TrainConfig
    from lmforge.data.preference import collate_preferences
    from lmforge.recipes.finetune import apply_lora
    from lmforge.train.preference import PreferenceLoss, reference_logprobs
    from lmforge.train.trainer import Trainer

    pad = model.tokenizer.eos_id
    pairs = reference_logprobs(model, pairs[:steps * BATCH], BATCH, pad)
    batches = [collate_preferences(pairs[i * BATCH:(i + 1) * BATCH], pad) for i in range(steps)]
    torch.manual_seed(0)
    trained = apply_lora(model, RANK, ALPHA, DROPOUT)
    config = TrainConfig(batch_size=BATCH, precision="fp32", max_steps=10**6, lr=LR, min_lr=LR, warmup_steps=0,
                         weight_decay=0.0, grad_clip=1.0)
    trainer = Trainer(trained, config, out=workdir / "lmforge", batches=lambda step, part, rows: batches[step],
                      loss_fn=PreferenceLoss(BETA))

    def step(index: int) -> float:
        trainer.step = index
        return trainer.train_step()

    return step, pairs


def trl_step(hf_dir: Path, records: list[dict], steps: int, workdir: Path):
    """TRL + peft's step over the same pairs; returns it and TRL's tokenized pairs (with their references)."""
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    args = trl.DPOConfig(output_dir=str(workdir / "trl"), beta=BETA, loss_type=["sigmoid"], learning_rate=LR,
                         per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, bf16=False, use_cpu=True,
                         precompute_ref_log_probs=True, report_to=[], max_grad_norm=1.0, dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records[:steps * BATCH]),
                             processing_class=transformers.AutoTokenizer.from_pretrained(hf_dir), peft_config=lora)
    policy = trainer.model
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    data = trainer.train_dataset
    batches = [trainer.data_collator([data[i] for i in range(s * BATCH, (s + 1) * BATCH)]) for s in range(steps)]

    def step(index: int) -> float:
        policy.train()
        loss = trainer.compute_loss(policy, batches[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, data


def speed(folder: Path, steps: int, rounds: int, workdir: Path) -> None:
    import lmforge
    from lmforge.data.preference import load_pairs
    from lmforge.interop import export_hf

    model = lmforge.load(MODEL)
    export_hf(model, workdir / "hf")
    records = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records]
    ours, pairs = lmforge_step(model, load_pairs(records, model.tokenizer, MAX_LENGTH), steps, workdir)
    theirs, trl_pairs = trl_step(workdir / "hf", records, steps, workdir)
    reference_gap = 0.0
    for pair, row in zip(pairs, trl_pairs):
        if (pair.prompt, pair.chosen, pair.rejected) != (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]):
            raise SystemExit(f"the two sides tokenized {pair.name} differently")
        reference_gap = max(reference_gap, abs(pair.reference[0] - row["ref_chosen_logps"]),
                            abs(pair.reference[1] - row["ref_rejected_logps"]))
    if reference_gap > 1e-3:
        raise SystemExit(f"the references' log-probabilities differ by {reference_gap:.2g}")
    tokens = [sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs[s * BATCH:(s + 1) * BATCH])
              for s in range(steps)]
    for fn in (ours, theirs):  # warm-up: one step each, not timed
        fn(0)
    rates: dict[str, list[float]] = {"lmforge": [], "trl": []}
    for r in range(rounds):
        order = [("lmforge", ours), ("trl", theirs)] if r % 2 == 0 else [("trl", theirs), ("lmforge", ours)]
        for name, fn in order:
            start = time.perf_counter()
            for s in range(steps):
                fn(s)
            rates[name].append(sum(tokens) / (time.perf_counter() - start))
    ratios = [a / b for a, b in zip(rates["lmforge"], rates["trl"])]
    emit({"figure": "dpo_speed", "pairs_per_step": BATCH, "steps_per_round": steps, "rounds": rounds,
          "tokens_per_s_lmforge": round(statistics.median(rates["lmforge"]), 1),
          "tokens_per_s_trl_peft": round(statistics.median(rates["trl"]), 1),
          "ratio_vs_trl": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
          "max_reference_logprob_difference": round(reference_gap, 6), "tokens_per_step": round(sum(tokens) / steps)})


# ------------------------------------------------------------------------------------------------
# quality


def quality(folder: Path, quick: bool, workdir: Path) -> None:
    import lmforge
    from lmforge.tasks.chat import reply

    out = workdir / "run"
    overrides = {"train.eval_interval": 25} if not quick else {"train.eval_interval": 2, "train.max_steps": 4}
    start = time.perf_counter()
    summary = lmforge.dpo(MODEL, folder, out, method="lora", beta=BETA, overrides=overrides)
    seconds = time.perf_counter() - start
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [e["tokens_per_s"] for e in evals if "tokens_per_s" in e]
    emit({"figure": "dpo_run", "steps": summary["step"], "seconds": round(seconds, 1),
          "tokens_per_s": round(statistics.median(rates), 1) if rates else None,
          "heldout_dpo_loss_before": summary["val_loss_before"], "heldout_dpo_loss_best": summary["best_val_loss"],
          "heldout_chosen_nll_before": summary["chosen_nll_before"]})
    emit({"figure": "dpo_curve", "evaluations": [{k: e[k] for k in ("step", "val_loss", "reward_accuracy", "margin",
                                                                   "chosen_nll") if k in e}
                                                 for e in evals if "reward_accuracy" in e]})
    base, tuned = lmforge.load(MODEL), lmforge.load(out / "best")
    best = [e for e in evals if "reward_accuracy" in e and e["val_loss"] == summary["best_val_loss"]][-1]
    emit({"figure": "dpo_heldout", "pairs": sum(1 for _ in (folder / "heldout.jsonl").open()),
          "reward_accuracy_before": 0.0, "reward_accuracy_after": best["reward_accuracy"],
          "margin_before": 0.0, "margin_after": best["margin"], "chosen_reward_after": best["chosen_reward"],
          "rejected_reward_after": best["rejected_reward"],
          "chosen_nll_before": summary["chosen_nll_before"], "chosen_nll_after": best["chosen_nll"],
          "best_step": best["step"]})
    emit({"figure": "dpo_general_ability", "before": held_out_quality(base, quick),
          "after": held_out_quality(tuned, quick)})
    held = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()][:3 if quick else 6]
    for pair in held:
        emit({"figure": "dpo_side_by_side", "prompt": pair["prompt"][-1]["content"],
              "human": pair["chosen"][0]["content"],
              "before": reply(base, pair["prompt"], max_new_tokens=60, temperature=0),
              "after": reply(tuned, pair["prompt"], max_new_tokens=60, temperature=0)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["speed", "quality", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer pairs, steps and rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1: beside other work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    emit(machine_state())
    folder = pairs_folder(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("speed", "all"):
            speed(folder, 1 if args.quick else args.steps, 2 if args.quick else args.rounds, Path(tmp))
        if args.part in ("quality", "all"):
            quality(folder, args.quick, Path(tmp))


if __name__ == "__main__":
    main()
