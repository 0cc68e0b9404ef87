"""Train an encoder-decoder (`kind: seq2seq`) on (source, target) pairs, and predict targets for sources.

    pairs = [{"source": "the article ...", "target": "its summary"}, ...]
    summary = train_seq2seq(pairs, val_pairs, tokenizer, "tiny", "runs/s2s", epochs=5)   # or a ModelConfig
    model = lmforge.load("runs/s2s")
    outputs = predict(model, ["another article ..."], beam_size=4, max_new_tokens=64)
    train_seq2seq(pairs, val_pairs, tokenizer, "tiny", "runs/cvae", elbo=ElboConfig())   # the conditional VAE
    predict(lmforge.load("runs/cvae"), ["an article"], z_seed=1)                          # one draw of z

The task verbs (`lmforge translate / summarize --model-kind seq2seq`) turn their datasets into pairs
and call these. Training goes through the one Trainer with `seq2seq_loss`; the run directory holds
`run.yaml`, `metrics.jsonl`, `loss.png`, `summary.json` and the checkpoint directory `checkpoint/`
(and `best/` with `train.keep_best`). Sources longer than the context and targets longer than the
context less one (the start token) are cut with a warning (`too_long="truncate"`) or rejected
(`"error"`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.config import (
    ElboConfig,
    ModelConfig,
    TrainConfig,
    fill_epoch_settings,
    from_dict,
    preset,
    save_yaml,
    to_dict,
)
from lmforge.errors import UserError
from lmforge.files import check_new_directory
from lmforge.models.seq2seq import Seq2Seq, encode_texts
from lmforge.train.objectives import Pair


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
) -> dict[str, Any]:
    """Train a Seq2Seq model from scratch on `train_pairs` into the run directory `out`; return the summary.

    With `elbo`, the model is the conditional VAE (`kind: cvae`, `lmforge.models.vae.ConditionalVAE`)
    trained on the same pairs with `ConditionalElboLoss`; its evaluations add `val_recon` and `val_kl`.

    `model_config` is a ModelConfig or a preset name (its kind becomes seq2seq, its vocabulary the
    tokenizer's); `max_length` sets its context (block_size). Training settings: `train_config` (default:
    lr 1e-3, batch 16, warmup 10% of the steps, best checkpoint kept), then `overrides`
    (`{"train.lr": 3e-4, "model.n_layer": 4}`); `epochs` sets max_steps (and one evaluation per epoch)
    unless an override gives them. The summary holds the final `val_loss` (nats per target token),
    `best_val_loss`, `step`, `train_seconds`, and the paths `out`, `checkpoint`, `loss_png`.
    """
    from lmforge.models import build_model
    from lmforge.train.objectives import ConditionalElboLoss, PairBatches, evaluate_pairs, seq2seq_loss
    from lmforge.train.trainer import Trainer

    out = Path(out)
    check_new_directory(out)
    overrides = dict(overrides or {})
    model_values = to_dict(preset(model_config) if isinstance(model_config, str) else model_config)
    kind = "seq2seq" if elbo is None else "cvae"
    model_values.update(kind=kind, vocab_size=tokenizer.vocab_size)
    if max_length is not None:
        model_values["block_size"] = max_length
    model_values.update({k.removeprefix("model."): v for k, v in overrides.items() if k.startswith("model.")})
    model_config = from_dict(ModelConfig, model_values, "model").validate()
    block = model_config.block_size
    train = encode_pairs(train_pairs, tokenizer, block, too_long, "train pairs")
    val = encode_pairs(val_pairs, tokenizer, block, too_long, "validation pairs")
    train_config = _train_settings(train_config, overrides, epochs, len(train))
    torch.manual_seed(train_config.seed)
    model = build_model(model_config)
    eos = tokenizer.eos_id
    batch_size = train_config.batch_size
    loss_fn = seq2seq_loss if elbo is None else ConditionalElboLoss(elbo, train_config.max_steps)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        if elbo is not None:
            from lmforge.tasks.vae import evaluate_conditional_elbo

            return evaluate_conditional_elbo(m, val, batch_size, eos, seed=train_config.seed)
        return {"val_loss": evaluate_pairs(m, val, batch_size, eos, next(m.parameters()).device)}

    batches = PairBatches(train, batch_size, train_config.seed, eos)
    tokens_per_row = sum(len(p.source) + len(p.target) + 1 for p in train) / len(train)
    trainer = Trainer(
        model, train_config, out, batches=batches, evaluate=evaluate, loss_fn=loss_fn, tokenizer=tokenizer,
        info={"task": kind, "train_pairs": len(train), "val_pairs": len(val), "parameters": model.num_parameters(),
              **({"elbo": to_dict(elbo.validate())} if elbo is not None else {}), **(info or {})},
        tokens_per_row=tokens_per_row, steps_per_epoch=batches.steps_per_epoch,
    )
    print(f"training a {kind} model ({model.num_parameters():,} parameters) on {len(train)} pairs, "
          f"{len(val)} held out", file=sys.stderr)
    if trainer.dist.main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(out / "run.yaml", model_config, train_config)
    summary = trainer.fit()
    summary = {**summary, "out": str(out), "checkpoint": str(out / "checkpoint"), "loss_png": str(out / "loss.png")}
    return trainer.finish(summary, title=f"{out.name}: {kind}, {model.num_parameters():,} params")


def _train_settings(train_config: TrainConfig | None, overrides: dict[str, Any], epochs: float | None,
                    n_train: int) -> TrainConfig:
    given = {k.removeprefix("train."): v for k, v in overrides.items() if k.startswith("train.")}
    unknown = [k for k in overrides if not k.startswith(("train.", "model."))]
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r}; expected model.FIELD or train.FIELD")
    if train_config is not None:
        values = {**to_dict(train_config), **given}
    else:
        values = {"lr": 1e-3, "min_lr": 1e-4, "batch_size": 16, "log_interval": 10, "keep_best": True, **given}
    if epochs is not None:  # epochs decide the steps unless a flag does (not a --config's max_steps)
        per_epoch = {"batch_size": values.get("batch_size", TrainConfig.batch_size), **given}
        fill_epoch_settings(per_epoch, n_train, epochs)
        values.update(per_epoch)
    if train_config is None and "warmup_steps" not in given:
        values["warmup_steps"] = max(1, values.get("max_steps", TrainConfig.max_steps) // 10)
    return from_dict(TrainConfig, values, "train").validate()


def predict(
    model: Seq2Seq,
    sources: Sequence[str],
    beam_size: int = 1,
    max_new_tokens: int = 64,
    length_penalty: float = 1.0,
    temperature: float = 0.0,
    seed: int | None = None,
    too_long: str = "truncate",
    batch_size: int = 32,
    z_seed: int | None = None,
) -> list[str]:
    """The model's output text for each source: greedy (default), sampled (temperature > 0) or beam search.

    A conditional VAE decodes from its prior's mean, or from a draw of z with `z_seed` (other seeds,
    other summaries).
    """
    if not isinstance(model, Seq2Seq):
        raise UserError(f"predict needs a seq2seq model; this one is a {type(model).__name__} "
                        f"(kind {getattr(model.config, 'kind', '?')})")
    return model.generate(list(sources), max_new_tokens=max_new_tokens, temperature=temperature,
                          beam_size=beam_size, length_penalty=length_penalty, seed=seed, too_long=too_long,
                          batch_size=batch_size, condition_options={"z_seed": z_seed} if z_seed is not None else None)
