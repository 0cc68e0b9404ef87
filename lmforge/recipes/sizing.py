"""Sizing a pretraining run to its corpus, its time budget and the measured speed of this machine.

    rules = Sizing()                                         # every rule on; Sizing.off(): the old demo
    vocab = vocab_for(corpus_bytes, rules)                   # the tokenizer, before any text is tokenized
    plan = plan_run(corpus_bytes, minutes=5, vocab_size=vocab, measure=measure_throughput, rules=rules)
    plan.overrides()                                         # {"model.n_layer": 4, ..., "train.max_steps": 600}
    print(plan.describe())                                   # what was chosen and why

What the rules are, each on by default (`lmforge demo --sizing.muon false` turns one off; the
ablation in the README measures each on and off at a fixed wall-clock budget):

- `small_vocab`: a BPE vocabulary of about one token per `BYTES_PER_TOKEN_TYPE` bytes of text, a power
  of two in 512..8192 (off: 8,192). A small corpus cannot teach a large vocabulary's rare tokens, and
  a small model spends less of itself on the embedding and the output layer.
- `llama`: Llama-style blocks, RMSNorm, SwiGLU, RoPE, no biases (off: GPT-2's).
- `sized_model`: the shape, compute-optimally for the budget: the largest shape of `SHAPES` whose
  throughput, measured here, lets it see at least `TOKENS_PER_PARAMETER` tokens per non-embedding
  parameter in the budget (off: gpt-micro's 4 x 256 shape). Either way, batches of `BATCH_TOKENS`
  tokens in windows of `BLOCK`: on a budget of minutes, more steps beat larger batches.
- `high_lr` (off by default: it lost the 5-minute ablation, 2.076 bits per byte without it against
  2.108 with it): a peak AdamW learning rate of 3e-3 up to width 256, falling as 1 / width above it
  (off: 1e-3).
- `muon`: Muon at `MUON_LR` on the hidden matrices, AdamW on the rest (off: AdamW everywhere).
- `wsd`: warmup, stable, then a linear warm-down to zero over the last 40% of the steps (off: cosine
  decay to a tenth, as before).

The steps of the run are what the budget holds at the measured throughput (90% of it: evaluations
and checkpoints take the rest), so that the schedule ends when the budget does.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lmforge.config import PRESETS, ModelConfig, TrainConfig, from_dict, param, split_overrides, to_dict
from lmforge.errors import UserError

BYTES_PER_TOKEN_TYPE = 5000  # small_vocab: one vocabulary entry per this many bytes of text
VOCAB_RANGE = (512, 8192)
OLD_VOCAB = 8192
# (n_layer, d_model), smallest first; heads of 64 dimensions
SHAPES = [(2, 128), (4, 128), (4, 192), (4, 256), (5, 320), (6, 384), (8, 512), (12, 768)]
TOKENS_PER_PARAMETER = 0.5  # sized_model: the least tokens per non-embedding parameter the budget must give
BLOCK = 256
BATCH_TOKENS = 2048  # tokens per optimizer step: 8 windows of 256
MUON_LR = 0.02  # muon: Keller Jordan's default, the same for every width
BUDGET_SHARE = 0.9  # of the budget spent in training steps; evaluations and checkpoints take the rest
OLD_PRESET = "gpt-micro"

Measure = Callable[[ModelConfig, TrainConfig], float]  # tokens per second of training


@dataclass
class Sizing:
    """The rules that size a pretraining run to its data and budget; each on by default but `high_lr`."""

    small_vocab: bool = param(True, "a vocabulary sized to the corpus, 512..8192 (off: 8192 tokens)")
    llama: bool = param(True, "Llama-style blocks: RMSNorm, SwiGLU, RoPE, no biases (off: GPT-2 blocks)")
    sized_model: bool = param(True, "the model shape from the budget and the measured throughput "
                                    "(off: gpt-micro's 4 x 256)")
    high_lr: bool = param(False, "a peak AdamW learning rate of 3e-3 up to width 256, 3e-3 x 256 / width above "
                                 "(off: 1e-3; off by default: it lost the 5-minute ablation, 2.108 against 2.076)")
    muon: bool = param(True, "Muon for the hidden matrices, AdamW for the rest (off: AdamW everywhere)")
    wsd: bool = param(True, "warmup, stable, linear warm-down to zero over the last 40% (off: cosine to lr/10)")

    @classmethod
    def off(cls) -> Sizing:
        """Every rule off: the demo as it was (gpt-micro, 8,192 tokens, AdamW at 1e-3, cosine)."""
        return cls(**{f.name: False for f in fields(cls)})


def vocab_for(corpus_bytes: int, rules: Sizing) -> int:
    """The tokenizer's vocabulary for a corpus of `corpus_bytes` UTF-8 bytes."""
    if not rules.small_vocab:
        return OLD_VOCAB
    wanted = max(1, corpus_bytes) / BYTES_PER_TOKEN_TYPE
    power = 2 ** round(math.log2(wanted)) if wanted >= 1 else 1
    return int(min(max(power, VOCAB_RANGE[0]), VOCAB_RANGE[1]))


def model_config(shape: tuple[int, int], vocab_size: int, rules: Sizing) -> ModelConfig:
    """The model of a (n_layer, d_model) shape: heads of 64 dimensions, Llama or GPT-2 blocks."""
    n_layer, d_model = shape
    style = PRESETS["llama-mini" if rules.llama else "gpt-mini"]
    blocks = {k: style[k] for k in ("norm", "mlp", "position", "bias", "tie_embeddings")}
    return ModelConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=n_layer, d_model=d_model,
                       n_head=max(1, d_model // 64), **blocks).validate()


def non_embedding_parameters(config: ModelConfig) -> int:
    """Parameters of the Transformer blocks (the N of compute-optimal sizing)."""
    d, kv = config.d_model, config.n_kv_head * config.head_dim
    ffn = (3 if config.mlp == "swiglu" else 2) * d * config.d_ff
    return config.n_layer * (d * (d + 2 * kv) + d * d + ffn)


@dataclass
class Plan:
    """A sized run: the model, the training settings, and why."""

    model: ModelConfig
    train: dict[str, Any]  # train.FIELD values
    tokens_per_s: float
    reasons: list[str] = field(default_factory=list)

    def overrides(self) -> dict[str, Any]:
        """The plan as `model.FIELD` / `train.FIELD` settings."""
        shape = ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "norm", "mlp", "position", "bias")
        return {**{f"model.{k}": getattr(self.model, k) for k in shape},
                **{f"train.{k}": v for k, v in self.train.items()}}

    def describe(self) -> str:
        """What was chosen and why, and the same run as flags."""
        flags = " ".join(f"--{k} {v}" for k, v in self.overrides().items())
        return "\n".join([*(f"  {r}" for r in self.reasons), f"  as flags: {flags}"])


def plan_run(corpus_bytes: int, minutes: float, vocab_size: int, measure: Measure, rules: Sizing,
             preset: str | None = None, given: dict[str, Any] | None = None) -> Plan:
    """Size a run of `minutes` on a corpus of `corpus_bytes` with a `vocab_size` tokenizer. `measure`
    times training steps of a model (tokens per second). With `preset`, the preset's shape is kept;
    the settings `given` (`model.FIELD`, `train.FIELD`) are kept too, and the steps are sized to them."""
    if minutes <= 0:
        raise UserError(f"the time budget is {minutes} minutes; expected a positive number")
    given = split_overrides(given)
    seconds = 60 * minutes * BUDGET_SHARE
    reasons = [f"vocabulary: {vocab_size:,} tokens" + (f" (about one per {BYTES_PER_TOKEN_TYPE:,} of the corpus' "
                                                       f"{corpus_bytes:,} bytes)" if rules.small_vocab else "")]
    optimizer = given["train"].get("optimizer", "muon" if rules.muon else "adamw")

    def probe(config: ModelConfig, batch: int) -> float:
        settings = {k: given["train"][k] for k in ("precision", "device") if k in given["train"]}
        return measure(config, TrainConfig(batch_size=batch, optimizer=optimizer, max_steps=10, warmup_steps=1,
                                           **settings))

    batch = given["train"].get("batch_size", BATCH_TOKENS // BLOCK if rules.sized_model else TrainConfig.batch_size)
    if preset is None and rules.sized_model and not given["model"]:
        model, tokens_per_s = _largest_shape(vocab_size, rules, seconds, lambda m: probe(m, batch))
        n = non_embedding_parameters(model)
        reasons.append(f"model: {model.n_layer} x {model.d_model} ({n:,} non-embedding parameters): at the "
                       f"{tokens_per_s:,.0f} tokens/s measured here it sees {tokens_per_s * seconds / n:.2f} tokens "
                       f"per parameter in {minutes:g} minutes, the largest shape with at least {TOKENS_PER_PARAMETER}")
    else:
        name = preset or OLD_PRESET
        model = ModelConfig(**{**PRESETS[name], "vocab_size": vocab_size}).validate()
        if preset is None and rules.llama:
            model = model_config((model.n_layer, model.d_model), vocab_size, rules)
        model = from_dict(ModelConfig, {**to_dict(model), **given["model"]}, "model").validate()
        tokens_per_s = probe(model, batch)
        reasons.append(f"model: {model.n_layer} x {model.d_model} ({non_embedding_parameters(model):,} non-embedding "
                       f"parameters; {'given' if given['model'] else name + chr(39) + 's shape'}), "
                       f"{tokens_per_s:,.0f} tokens/s measured here")
    steps = max(10, int(seconds * tokens_per_s / (batch * model.block_size)))
    reasons.append(f"batch: {batch} x {model.block_size} tokens, {steps:,} steps in {minutes:g} minutes")
    lr = 3e-3 * min(1.0, 256 / model.d_model) if rules.high_lr else TrainConfig.lr
    train = {"batch_size": batch, "max_steps": steps, "max_minutes": minutes, "optimizer": optimizer, "lr": lr,
             "eval_interval": max(1, steps // 5), "eval_batches": 8, "log_interval": max(1, min(10, steps // 50))}
    if optimizer == "muon":
        train["muon_lr"] = MUON_LR
        reasons.append(f"optimizer: Muon at {MUON_LR:g} for the hidden matrices, AdamW at {lr:g} for "
                       f"embeddings and gains")
    else:
        reasons.append(f"optimizer: AdamW at {lr:g}")
    if rules.wsd:
        train.update(schedule="wsd", warmup_steps=min(20, max(1, steps // 20)), decay_fraction=0.4, min_lr=0.0)
        reasons.append("schedule: warmup, stable, linear warm-down to 0 over the last 40% of the steps")
    else:
        train.update(schedule="cosine", warmup_steps=max(1, steps // 20), min_lr=min(lr, TrainConfig.min_lr))
        reasons.append(f"schedule: warmup over {train['warmup_steps']} steps, cosine decay to {train['min_lr']:g}")
    return Plan(model, train, tokens_per_s, reasons)


def _largest_shape(vocab_size: int, rules: Sizing, seconds: float,
                   measure: Callable[[ModelConfig], float]) -> tuple[ModelConfig, float]:
    """The largest shape of SHAPES that sees at least TOKENS_PER_PARAMETER tokens per non-embedding
    parameter in `seconds` (the smallest when none does), and its throughput. Shapes are timed from the
    smallest up, and the walk stops at the first that falls short."""
    chosen: tuple[ModelConfig, float] | None = None
    for shape in SHAPES:
        config = model_config(shape, vocab_size, rules)
        tokens_per_s = measure(config)
        if chosen is not None and tokens_per_s * seconds < TOKENS_PER_PARAMETER * non_embedding_parameters(config):
            break
        chosen = (config, tokens_per_s)
    assert chosen is not None
    return chosen


def measure_throughput(model: ModelConfig, train: TrainConfig, steps: int = 2) -> float:
    """Training tokens per second of `model` under `train` (batch, precision, optimizer), timed over a
    few steps on random tokens after one warm-up step."""
    from lmforge.models.decoder import Decoder
    from lmforge.train.trainer import Trainer

    torch.manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (train.batch_size, model.block_size + 1))
    batch = {"ids": ids[:, :-1], "targets": ids[:, 1:]}
    scratch = Path(tempfile.mkdtemp(prefix="lmforge-calibrate-"))
    try:
        trainer = Trainer(Decoder(model), train, scratch, batches=lambda *_: batch)
        trainer.train_step()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return steps * train.batch_size * model.block_size / seconds
