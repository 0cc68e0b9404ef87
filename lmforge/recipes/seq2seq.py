"""The encoder-decoder recipe: a Seq2Seq model (or the conditional VAE) from scratch on (source, target) pairs.

    pairs = [{"source": "the article ...", "target": "its summary"}, ...]
    summary = train_seq2seq(pairs, val_pairs, tokenizer, "tiny", "runs/s2s", epochs=5)   # or a ModelConfig
    train_seq2seq(pairs, val_pairs, tokenizer, "tiny", "runs/cvae", elbo=ElboConfig())   # the conditional VAE

The task verbs (`lmforge translate / summarize --model-kind seq2seq`) turn their datasets into pairs
and call this. Training goes through the one Trainer with `seq2seq_loss`; the run directory holds
`run.yaml`, `metrics.jsonl`, `loss.png`, `summary.json` and the checkpoint directory `checkpoint/`
(and `best/`). Sources longer than the context and targets longer than the context less one (the
start token) are cut with a warning (`too_long="truncate"`) or rejected (`"error"`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.config import (
    ElboConfig,
    ModelConfig,
    ScratchTrainConfig,
    TrainConfig,
    from_dict,
    merge_settings,
    preset,
    resolve_train,
    split_overrides,
    to_dict,
)
from lmforge.errors import UserError
from lmforge.models import build_model
from lmforge.models.seq2seq import encode_texts
from lmforge.train.objectives import ConditionalElboLoss, Pair, evaluate_pairs, pair_batches, seq2seq_loss
from lmforge.train.recipe import Job, Recipe, run_recipe, say


def check_pairs(pairs: Sequence[dict[str, Any]], where: str) -> None:
    """Each item must be a mapping with string `source` and `target`."""
    if not pairs:
        raise UserError(f"{where}: no pairs; expected a list of {{'source': str, 'target': str}}")
    for i, pair in enumerate(pairs, start=1):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) for k in ("source", "target")):
            raise UserError(f"{where}: item {i} is not a {{'source': str, 'target': str}} mapping")


def encode_pairs(pairs: Sequence[dict[str, Any]], tokenizer, block_size: int, too_long: str = "truncate",
                 where: str = "pairs") -> list[Pair]:
    """Token ids of each pair: sources at most `block_size`, targets at most `block_size - 1` tokens."""
    check_pairs(pairs, where)
    sources = encode_texts([p["source"] for p in pairs], tokenizer, block_size, too_long, f"{where}: source")
    targets = encode_texts([p["target"] for p in pairs], tokenizer, block_size - 1, too_long, f"{where}: target")
    return [Pair(s, t) for s, t in zip(sources, targets)]


class TrainSeq2Seq(Recipe):
    def __init__(self, train_pairs: Sequence[dict[str, Any]], val_pairs: Sequence[dict[str, Any]], tokenizer,
                 model_config: ModelConfig | str, train_config: TrainConfig | None = None,
                 epochs: float | None = None, max_length: int | None = None,
                 overrides: dict[str, Any] | None = None, too_long: str = "truncate",
                 info: dict[str, Any] | None = None, elbo: ElboConfig | None = None):
        super().__init__()
        self.name = "seq2seq" if elbo is None else "cvae"
        given = split_overrides(overrides)
        values = to_dict(preset(model_config) if isinstance(model_config, str) else model_config)
        values.update(kind=self.name, vocab_size=tokenizer.vocab_size)
        if max_length is not None:
            values["block_size"] = max_length
        self.model_config = from_dict(ModelConfig, {**values, **given["model"]}, "model").validate()
        settings = merge_settings(ScratchTrainConfig, {f"train.{k}": v for k, v in given["train"].items()},
                                  base=train_config)
        if epochs is not None:  # epochs decide the steps and evaluations unless a setting does
            settings.max_steps = given["train"].get("max_steps")
            settings.eval_interval = given["train"].get("eval_interval")
        self.train_settings, self.epochs = settings, epochs
        self.pairs, self.val_pairs, self.tokenizer = train_pairs, val_pairs, tokenizer
        self.too_long, self.elbo, self.info = too_long, elbo, dict(info or {})

    def settings(self) -> dict[str, Any]:
        return {**self.info, "train_pairs": len(self.pairs), "val_pairs": len(self.val_pairs),
                "elbo": to_dict(self.elbo) if self.elbo is not None else None}

    def build(self) -> Job:
        block, tokenizer = self.model_config.block_size, self.tokenizer
        train = encode_pairs(self.pairs, tokenizer, block, self.too_long, "train pairs")
        val = encode_pairs(self.val_pairs, tokenizer, block, self.too_long, "validation pairs")
        self.train, steps_per_epoch = resolve_train(self.train_settings, len(train), self.epochs)
        torch.manual_seed(self.train.seed)
        model = build_model(self.model_config)
        self.n_params = model.num_parameters()
        eos, batch_size, elbo = tokenizer.eos_id, self.train.batch_size, self.elbo
        loss_fn = seq2seq_loss if elbo is None else ConditionalElboLoss(elbo, self.train.max_steps)

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            if elbo is not None:
                from lmforge.recipes.vae import evaluate_conditional_elbo

                return evaluate_conditional_elbo(m, val, batch_size, eos, seed=self.train.seed)
            return {"val_loss": evaluate_pairs(m, val, batch_size, eos)}

        say(f"training a {self.name} model ({self.n_params:,} parameters) on {len(train)} pairs, {len(val)} held out")
        return Job(model, pair_batches(train, batch_size, self.train.seed, eos), loss_fn=loss_fn, evaluate=evaluate,
                   tokenizer=tokenizer,
                   info={"task": self.name, "train_pairs": len(train), "val_pairs": len(val),
                         "parameters": self.n_params,
                         **({"elbo": to_dict(elbo.validate())} if elbo is not None else {}), **self.info},
                   tokens_per_row=sum(len(p.source) + len(p.target) + 1 for p in train) / len(train),
                   steps_per_epoch=steps_per_epoch)

    def report(self, trainer, summary: dict[str, Any]) -> dict[str, Any]:
        out = Path(summary["out"])
        return {**summary, "checkpoint": str(out / "checkpoint"), "loss_png": str(out / "loss.png")}

    def title(self, job: Job, out: Path) -> str:
        return f"{out.name}: {self.name}, {self.n_params:,} params"


def train_seq2seq(
    train_pairs: Sequence[dict[str, Any]],
    val_pairs: Sequence[dict[str, Any]],
    tokenizer,
    model_config: ModelConfig | str,
    out: str | Path,
    train_config: TrainConfig | None = None,
    epochs: float | None = None,
    max_length: int | None = None,
    overrides: dict[str, Any] | None = None,
    too_long: str = "truncate",
    info: dict[str, Any] | None = None,
    elbo: ElboConfig | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a Seq2Seq model from scratch on `train_pairs` into the run directory `out`; return the summary.

    With `elbo`, the model is the conditional VAE (`kind: cvae`, `lmforge.models.vae.ConditionalVAE`)
    trained on the same pairs with `ConditionalElboLoss`; its evaluations add `val_recon` and `val_kl`.

    `model_config` is a ModelConfig or a preset name (its kind becomes seq2seq, its vocabulary the
    tokenizer's); `max_length` sets its context (block_size). Training settings: `train_config` (default:
    `ScratchTrainConfig`: lr 1e-3, batch 16, warmup 10% of the steps, best checkpoint kept), then `overrides`
    (`{"train.lr": 3e-4, "model.n_layer": 4}`); `epochs` sets max_steps (and one evaluation per epoch)
    unless an override gives them. The summary holds the final `val_loss` (nats per target token),
    `best_val_loss`, `step`, `train_seconds`, and the paths `out`, `checkpoint`, `loss_png`.
    """
    recipe = TrainSeq2Seq(train_pairs, val_pairs, tokenizer, model_config, train_config, epochs, max_length,
                          overrides, too_long, info, elbo)
    return run_recipe(recipe, out, resume)
