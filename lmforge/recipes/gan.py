"""The GAN recipe: adversarial training (SeqGAN-style) of a decoder pretrained with maximum likelihood.

    summary = train_gan("runs/lines-mle", "shakespeare", "runs/gan", reward="prefix", d_steps=1, mle_weight=0.5)
    lmforge gan train --generator runs/lines-mle --data shakespeare --out runs/gan [--reward rollout --rollouts 4]
    lmforge generate runs/gan --prompt "" --temperature 1        # the trained generator, as any decoder

The data is lines of text: every line of at least `min_words` words (not all capitals: no speaker names or
titles) of a catalog dataset (shakespeare: its plays' lines; kjv: its verses) or of local text files, each
a sequence `[eos] line [eos]` of at most `max_tokens` tokens after the start; the generator samples from the
start token (`eos`), so it should have been pretrained on such lines (documents end with eos in
`lmforge prepare`; bench/gan.py shows the whole route). Held out: the catalog's validation split, or
--val-fraction of the lines.

How it fits the one Trainer without a second loop: the generator and the discriminator are one module
(`lmforge.train.adversarial.GANPair`) under one optimizer, and each optimizer step is either a
discriminator step or a generator step, chosen by the step number (`d_warmup` discriminator steps first,
then `d_steps` discriminator steps per generator step). A discriminator step samples a batch from the
generator (no gradient) and takes the binary cross-entropy of real against sampled lines at every
prefix; a generator step samples a batch, scores it (per-prefix rewards, or SeqGAN's Monte-Carlo
roll-outs) and minimises `reinforce_loss` + `mle_weight` x the cross-entropy of a batch of real lines.
The module that is not in a step's loss gets no gradient (its grads stay None), and AdamW, fused or
not, skips parameters without a gradient: no update, no weight decay, its moments untouched. Samples
and roll-outs come from the one generate loop (`generate_ids`); the log-probabilities of the sampled
tokens from one forward pass over the sampled sequences.

The discriminator is a copy of the generator's decoder with a linear real/fake head on every position
(causal: the logit at t sees the prefix up to t), so it reads the same tokens, starts from features of
the language rather than from nothing, and gives a reward for every prefix for the price of one forward
pass; its weights are its own (training it never moves the generator).

Logged at each evaluation (metrics.jsonl, progress, gan.png): the held-out loss of the generator on real
lines (`val_nll`, nats per token) and bits per byte (`val_bpb`); on `eval_samples` lines sampled at
temperature 1: distinct-1/2/3 of their words, the share of repeated samples, the discriminator's
accuracy on them against as many held-out lines (`d_accuracy`) and their mean reward; and the training
figures since the last evaluation (`train_d_loss`, `train_d_accuracy`, `train_pg_loss`, `train_mle_loss`,
`train_reward`). A few samples go into metrics.jsonl as `{"step", "samples"}` lines. Mode collapse (samples
with less than half the distinct bigrams of real lines, or over a quarter of them repeated) is said on
stderr when seen and counted in the summary (`mode_collapse_evals`).

The checkpoint in OUT/checkpoint is the generator's (loadable by `lmforge generate`, `lmforge.load`),
with the discriminator beside it in `discriminator.safetensors`. One process only (no torchrun); a run
cannot be resumed (it is a few minutes long: start it again).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from lmforge.config import GANTrainConfig, merge_settings, resolve_train, settings
from lmforge.data.batches import EpochBatches, hold_out
from lmforge.errors import UserError
from lmforge.infer import pad_right
from lmforge.recipes.finetune import describe_source
from lmforge.train.adversarial import (
    Discriminator,
    GANPair,
    advantages,
    as_sequence,
    discriminator_loss,
    distinct_n,
    prefix_rewards,
    reinforce_loss,
    repeated_share,
    returns_to_go,
    rollout_rewards,
    sample_sequences,
    texts_of,
)
from lmforge.train.recipe import Job, Recipe, run_recipe, say

REWARDS = ("prefix", "rollout")
COLLAPSE_DISTINCT_RATIO, COLLAPSE_REPEATED = 0.5, 0.25  # mode collapse: below half the real distinct-2, or repeats


# ----------------------------------------------------------------------------------------------
# data: lines of text


def read_lines(source: str | Path | Sequence[str], split: str = "train", min_words: int = 4) -> list[str]:
    """The lines of at least `min_words` words, not all capitals, of a catalog dataset's `split` (the `text`
    of its records), of local text files (every line of every document), or of texts in memory."""
    if isinstance(source, (str, Path)) and Path(source).exists():
        from lmforge.data import read_documents

        texts = [d.text for d in read_documents(source)]
    elif isinstance(source, (str, Path)):
        from lmforge.data import load

        records = load(str(source), split)
        if records and "text" not in records[0]:
            raise UserError(f"dataset {source} has no text field (fields: {', '.join(records[0])}); "
                            f"expected a text dataset such as shakespeare or kjv")
        texts = [r["text"] for r in records]
    else:
        texts = list(source)
    lines = (line.strip() for text in texts for line in str(text).splitlines())
    return [line for line in lines if len(line.split()) >= min_words and not line.isupper()]


def heldout_bits(generator: torch.nn.Module, rows: Sequence[Sequence[int]], texts: Sequence[str], pad_id: int,
                 batch_size: int) -> dict[str, float]:
    """The generator's loss on held-out sequences: nats per token (every token after the start) and bits per
    UTF-8 byte (each line's bytes and one for its end)."""
    device = next(generator.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_right(rows[start:start + batch_size], pad_id, device)
            targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
            logprobs = generator(ids[:, :-1], targets, token_logprobs=True)
            total -= logprobs.float().sum().item()
            tokens += int(mask[:, 1:].sum())
    utf8 = sum(len(t.encode("utf-8")) + 1 for t in texts)
    return {"val_nll": total / tokens, "val_bpb": total / (utf8 * math.log(2))}


def sample_scores(texts: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Distinct-1/2/3 and the repeated share of samples, and whether they look collapsed against as many
    real lines (`mode_collapse` 1.0: under half their distinct-2, or over a quarter repeated)."""
    scores = {f"distinct_{n}": distinct_n(texts, n) for n in (1, 2, 3)}
    scores["repeated"] = repeated_share(texts)
    real = distinct_n(references[:len(texts)], 2)
    collapsed = scores["distinct_2"] < COLLAPSE_DISTINCT_RATIO * real or scores["repeated"] > COLLAPSE_REPEATED
    return {**scores, "mode_collapse": float(collapsed)}


# ----------------------------------------------------------------------------------------------
# the objective: a discriminator step or a generator step


class AdversarialLoss:
    """The loss of one step of the GAN (see the module docstring); keeps the training figures of the steps
    since the last `take_stats`."""

    def __init__(self, eos_id: int, max_tokens: int, reward: str, rollouts: int, discount: float,
                 mle_weight: float):
        self.eos_id, self.max_tokens, self.reward, self.rollouts = eos_id, max_tokens, reward, rollouts
        self.discount, self.mle_weight = discount, mle_weight
        self.stats: dict[str, list[float]] = {}

    def __call__(self, pair: GANPair, batch: dict[str, Any]) -> torch.Tensor:
        real, real_mask = batch["ids"], batch["mask"]
        device = real.device
        rows = sample_sequences(pair.generator, len(real), self.eos_id, self.max_tokens)
        fake, fake_mask = pad_right(rows, self.eos_id, device)
        if batch["phase"] == "discriminator":
            real_logits, fake_logits = pair.discriminator(real), pair.discriminator(fake)
            loss = discriminator_loss(real_logits[:, 1:], real_mask[:, 1:], fake_logits[:, 1:], fake_mask[:, 1:])
            index = torch.arange(len(real), device=device)
            right = torch.cat([real_logits[index, real_mask.sum(1) - 1] > 0,
                               fake_logits[index, fake_mask.sum(1) - 1] <= 0])
            self._note(d_loss=loss.item(), d_accuracy=right.float().mean().item())
            return loss
        token_mask = fake_mask[:, 1:]  # the sampled tokens (after the start)
        with torch.no_grad():
            if self.reward == "rollout":
                returns = rollout_rewards(pair.generator, pair.discriminator, rows, self.eos_id, self.max_tokens,
                                          self.rollouts).to(device)
                final = returns[torch.arange(len(rows), device=device), token_mask.sum(1) - 1]
            else:
                rewards = prefix_rewards(pair.discriminator(fake)[:, 1:]) * token_mask
                final = rewards[torch.arange(len(rows), device=device), token_mask.sum(1) - 1]
                returns = returns_to_go(rewards, token_mask, self.discount)
        targets = fake[:, 1:].masked_fill(~token_mask, -100)
        logprobs = pair.generator(fake[:, :-1], targets, token_logprobs=True)
        pg = reinforce_loss(logprobs.float(), advantages(returns, token_mask), token_mask)
        real_targets = real[:, 1:].masked_fill(~real_mask[:, 1:], -100)
        mle = pair.generator(real[:, :-1], real_targets).float()
        self._note(pg_loss=pg.item(), mle_loss=mle.item(), reward=final.mean().item(),
                   sample_tokens=token_mask.sum(1).float().mean().item())
        return pg + self.mle_weight * mle

    def _note(self, **values: float) -> None:
        for key, value in values.items():
            self.stats.setdefault(key, []).append(value)

    def take_stats(self) -> dict[str, float]:
        """The mean of each training figure since the last call, as `train_NAME`; then forget them."""
        out = {f"train_{k}": sum(v) / len(v) for k, v in self.stats.items() if v}
        self.stats = {}
        return out


def phase_of(step: int, d_steps: int, d_warmup: int) -> str:
    """`discriminator` for the first `d_warmup` steps, then `d_steps` of every `d_steps + 1`; else `generator`."""
    if step < d_warmup or (step - d_warmup) % (d_steps + 1) < d_steps:
        return "discriminator"
    return "generator"


# ----------------------------------------------------------------------------------------------
# the recipe


class GANTrain(Recipe):
    name = "gan"

    def __init__(self, generator: Any, data: Any, reward: str = "prefix", rollouts: int = 4, d_steps: int = 1,
                 d_warmup: int = 20, mle_weight: float = 0.5, discount: float = 0.9, max_tokens: int = 32,
                 min_words: int = 4, val_data: Any = None, val_fraction: float = 0.05, eval_samples: int = 64,
                 overrides: dict[str, Any] | None = None):
        super().__init__()
        checks = [(reward in REWARDS, f"--reward = {reward!r}; expected one of {', '.join(REWARDS)}"),
                  (rollouts >= 1, f"--rollouts = {rollouts}; expected at least 1 roll-out per prefix"),
                  (d_steps >= 1, f"--d-steps = {d_steps}; expected at least 1 discriminator step per generator step"),
                  (d_warmup >= 0, f"--d-warmup = {d_warmup}; expected >= 0"),
                  (0 <= mle_weight < math.inf, f"--mle-weight = {mle_weight}; expected a number >= 0"),
                  (0 <= discount <= 1, f"--discount = {discount}; expected a value in [0, 1]"),
                  (max_tokens >= 2, f"--max-tokens = {max_tokens}; expected at least 2"),
                  (min_words >= 1, f"--min-words = {min_words}; expected at least 1"),
                  (eval_samples >= 2, f"--eval-samples = {eval_samples}; expected at least 2")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self.generator, self.data, self.reward, self.rollouts = generator, data, reward, rollouts
        self.d_steps, self.d_warmup, self.mle_weight, self.discount = d_steps, d_warmup, mle_weight, discount
        self.max_tokens, self.min_words, self.val_data, self.val_fraction = max_tokens, min_words, val_data, \
            val_fraction
        self.eval_samples = eval_samples
        self.train_settings = merge_settings(GANTrainConfig, overrides).validate()  # before anything is read
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or self.train_settings.strategy == "fsdp":
            raise UserError("lmforge gan train runs in one process (no torchrun, no train.strategy fsdp)")
        self.name_of_generator = describe_source(generator)
        self.step_seen, self.collapses = 0, 0

    def settings(self) -> dict[str, Any]:
        return {"generator": self.name_of_generator, "data": describe_source(self.data), "reward": self.reward,
                "rollouts": self.rollouts, "d_steps": self.d_steps, "d_warmup": self.d_warmup,
                "mle_weight": self.mle_weight, "discount": self.discount, "max_tokens": self.max_tokens,
                "min_words": self.min_words, "eval_samples": self.eval_samples,
                "val_data": None if self.val_data is None else describe_source(self.val_data)}

    def build(self) -> Job:
        generator = load_generator(self.generator)
        tokenizer, eos = generator.tokenizer, generator.tokenizer.eos_id
        if self.max_tokens + 1 >= generator.config.block_size:
            raise UserError(f"--max-tokens = {self.max_tokens}: a sequence (the start token and {self.max_tokens} "
                            f"more) must fit the generator's context of {generator.config.block_size} tokens with "
                            f"one to spare; use at most {generator.config.block_size - 2}")
        train_lines, val_lines = self._lines()
        batch_size = self.train_settings.batch_size
        if len(train_lines) < batch_size:
            raise UserError(f"{describe_source(self.data)}: only {len(train_lines)} training line(s) of at least "
                            f"{self.min_words} words; a batch needs train.batch_size = {batch_size}: give more text "
                            f"(or a smaller --train.batch_size / --min-words)")
        self.train, steps_per_epoch = resolve_train(self.train_settings, len(train_lines))
        train_rows = [as_sequence(ids, eos, self.max_tokens) for ids in tokenizer.encode_batch(train_lines)]
        n_val = min(len(val_lines), self.train.eval_batches * batch_size)
        val_texts = val_lines[:n_val]
        val_rows = [as_sequence(ids, eos, self.max_tokens) for ids in tokenizer.encode_batch(val_texts)]
        torch.manual_seed(self.train.seed)
        pair = GANPair(generator, Discriminator(copy.deepcopy(generator)))
        objective = AdversarialLoss(eos, self.max_tokens, self.reward, self.rollouts, self.discount, self.mle_weight)
        self.out = None  # set by ready()

        def evaluate(m: GANPair) -> dict[str, float]:
            scores = heldout_bits(m.generator, val_rows, val_texts, eos, batch_size)
            samples = sample_sequences(m.generator, self.eval_samples, eos, self.max_tokens, seed=self.train.seed)
            texts = texts_of(tokenizer, samples)
            scores.update(sample_scores(texts, val_texts))
            real = val_rows[:len(samples)]
            real_logits = m.discriminator.final_logits(real, eos)
            fake_logits = m.discriminator.final_logits(samples, eos)
            scores["d_accuracy"] = torch.cat([real_logits > 0, fake_logits <= 0]).float().mean().item()
            scores["reward"] = prefix_rewards(fake_logits).mean().item()
            self._log_samples(texts, scores)
            return {**scores, **objective.take_stats()}

        def collate(picks: list[int], step: int, part: int) -> dict[str, Any]:
            self.step_seen = step + 1
            ids, mask = pad_right([train_rows[i] for i in picks], eos)
            return {"ids": ids, "mask": mask, "phase": phase_of(step, self.d_steps, self.d_warmup)}

        phases = [phase_of(s, self.d_steps, self.d_warmup) for s in range(self.train.max_steps)]
        generator_steps = phases.count("generator")
        say(f"GAN ({self.reward} rewards{f', {self.rollouts} roll-outs' if self.reward == 'rollout' else ''}) of "
            f"{self.name_of_generator} ({generator.num_parameters():,} parameters, and a discriminator of as many) "
            f"on {len(train_lines):,} lines, {len(val_lines):,} held out; {self.train.max_steps} steps: "
            f"{generator_steps} generator, {self.train.max_steps - generator_steps} discriminator")
        self.n_lines = (len(train_lines), len(val_lines))
        return Job(pair, EpochBatches(range(len(train_rows)), batch_size, self.train.seed, collate),
                   loss_fn=objective, evaluate=evaluate, tokenizer=tokenizer,
                   info={"base": self.name_of_generator, "data": describe_source(self.data),
                         "gan": {k: v for k, v in self.settings().items() if k not in ("generator", "data")}},
                   tokens_per_row=sum(map(len, train_rows[:256])) / min(256, len(train_rows)),
                   steps_per_epoch=steps_per_epoch)

    def _lines(self) -> tuple[list[str], list[str]]:
        data, val_data = self.data, self.val_data
        is_catalog = isinstance(data, (str, Path)) and not Path(data).exists()
        lines = read_lines(data, "train", self.min_words)
        if val_data is None and is_catalog:
            val_data = data  # a catalog dataset: its own validation split
        if val_data is not None:
            return lines, read_lines(val_data, "validation", self.min_words)
        return hold_out(lines, self.val_fraction, seed=0, what="line")

    def ready(self, trainer) -> None:
        self.out = trainer.out  # where evaluations write their samples

    def _log_samples(self, texts: list[str], scores: dict[str, float]) -> None:
        """A few samples into metrics.jsonl; a mode-collapse warning on stderr."""
        if self.out is None:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step_seen, "samples": texts[:5]}) + "\n")
        if scores["mode_collapse"]:
            self.collapses += 1
            tqdm.write(f"mode collapse at step {self.step_seen}: distinct-2 {scores['distinct_2']:.3f}, "
                       f"{scores['repeated']:.0%} of the samples repeated (e.g. {texts[0][:60]!r})")

    def before(self, trainer) -> dict[str, Any]:
        metrics = trainer.evaluate(trainer.model.eval())
        say(f"before: held-out {metrics['val_bpb']:.4f} bits per byte, distinct-2 {metrics['distinct_2']:.3f}, "
            f"discriminator accuracy {metrics['d_accuracy']:.3f}")
        return {f"{k}_before": round(v, 6) for k, v in metrics.items()
                if k in ("val_nll", "val_bpb", "distinct_2", "repeated", "d_accuracy")}

    def report(self, trainer, summary: dict[str, Any]) -> dict[str, Any]:
        from lmforge.plots import plot_panels

        out = Path(summary["out"])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        plot_panels(records, {"losses": ["train_d_loss", "train_pg_loss", "train_mle_loss"],
                              "discriminator accuracy": ["train_d_accuracy", "d_accuracy"],
                              "reward (2 sigmoid(D) - 1)": ["train_reward", "reward"],
                              "held-out bits per byte": ["val_bpb"],
                              "diversity of samples": ["distinct_2", "distinct_3", "repeated"]},
                    out / "gan.png", title=f"{Path(self.name_of_generator).name}: GAN ({self.reward} rewards)")
        return {**summary, "generator": str(out / "checkpoint"), "gan_png": str(out / "gan.png"),
                "mode_collapse_evals": self.collapses, "lines": {"train": self.n_lines[0], "heldout": self.n_lines[1]}}

    def title(self, job: Job, out: Path) -> str:
        return f"{Path(self.name_of_generator).name} GAN (loss: discriminator and generator steps)"


def load_generator(source: Any) -> torch.nn.Module:
    """A decoder with a tokenizer to train as the generator; anything else is a one-line error."""
    if isinstance(source, torch.nn.Module):
        model = source
    else:
        from lmforge.recipes.classify import HEAD_CONFIG
        from lmforge.sources import load
        from lmforge.train.checkpoint import resolve_checkpoint

        if Path(source).exists() and (resolve_checkpoint(source) / HEAD_CONFIG).is_file():
            raise UserError(f"--generator {source} is a classifier checkpoint; expected a decoder (a language model "
                            f"pretrained with maximum likelihood, e.g. by lmforge pretrain)")
        model = load(source, dequantize=True)
    kind = getattr(getattr(model, "config", None), "kind", None)
    if kind != "decoder" or not hasattr(model, "hidden_states"):
        raise UserError(f"--generator {describe_source(source)} is a {kind or type(model).__name__} model; expected "
                        f"a decoder (a language model pretrained with maximum likelihood, e.g. by lmforge pretrain)")
    if getattr(model, "tokenizer", None) is None:
        raise UserError(f"--generator {describe_source(source)} has no tokenizer")
    return model


@settings(train=GANTrainConfig)
def train_gan(
    generator: str | Path | torch.nn.Module,
    data: str | Path | Sequence[str],
    out: str | Path,
    reward: Literal["prefix", "rollout"] = "prefix",
    rollouts: int = 4,
    d_steps: int = 1,
    d_warmup: int = 20,
    mle_weight: float = 0.5,
    discount: float = 0.9,
    max_tokens: int = 32,
    min_words: int = 4,
    val_data: str | Path | Sequence[str] | None = None,
    val_fraction: float = 0.05,
    eval_samples: int = 64,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a pretrained decoder adversarially (SeqGAN-style REINFORCE against a discriminator) on lines of text.

    Each step is a discriminator step (real lines against fresh samples, at every prefix) or a generator step
    (policy gradient with a baseline on the discriminator's rewards, plus --mle-weight x the likelihood of real
    lines). Logs losses, discriminator accuracy, rewards, held-out bits per byte, distinct-n and repeated
    samples (mode collapse is said when seen) to metrics.jsonl and OUT/gan.png; the generator is saved in
    OUT/checkpoint (lmforge generate OUT), the discriminator beside it.

    Args:
        generator: the generator to start from: a decoder checkpoint pretrained with maximum likelihood (or any
            decoder lmforge.load takes)
        data: lines of text: a catalog dataset (shakespeare, kjv) or text files (each line a sequence)
        out: the run directory to create
        reward: prefix (the discriminator scores every prefix: per-token rewards, discounted returns) or
            rollout (SeqGAN: Monte-Carlo roll-outs complete every prefix, the discriminator scores them)
        rollouts: roll-outs per prefix with --reward rollout
        d_steps: discriminator steps per generator step
        d_warmup: discriminator-only steps at the start (the generator's rewards mean little before)
        mle_weight: weight of the maximum-likelihood loss on real lines in the generator's loss
        discount: discount of future per-token rewards in the returns (--reward prefix)
        max_tokens: tokens per sequence after the start token (its end token included); longer lines are cut
        min_words: lines with fewer words are left out (speaker names, stage directions)
        val_data: held-out lines (default: the catalog's validation split, or --val-fraction of DATA)
        val_fraction: the share of DATA held out when there is neither --val-data nor a catalog split
        eval_samples: lines sampled at each evaluation (diversity, discriminator accuracy)
        overrides: train.FIELD settings
    """
    recipe = GANTrain(generator, data, reward, rollouts, d_steps, d_warmup, mle_weight, discount, max_tokens,
                      min_words, val_data, val_fraction, eval_samples, overrides)
    return run_recipe(recipe, out, resume=False)


def trained(summary: dict[str, Any], arguments: dict[str, Any]) -> str:
    """What `lmforge gan train` prints when it is done."""
    collapse = (f"; mode collapse seen at {summary['mode_collapse_evals']} evaluation(s)"
                if summary.get("mode_collapse_evals") else "")
    return (f"held-out bits per byte {summary.get('val_bpb_before', float('nan')):.4f} before, "
            f"{summary.get('val_bpb', float('nan')):.4f} after; distinct-2 {summary.get('distinct_2_before', 0):.3f} "
            f"before, {summary.get('distinct_2', 0):.3f} after; discriminator accuracy "
            f"{summary.get('d_accuracy', float('nan')):.3f}{collapse}; the generator is in {arguments['out']} "
            f"(curves in {arguments['out']}/gan.png)")
