"""The pretraining recipe: a decoder from scratch on prepared token shards (`lmforge prepare`).

    summary = pretrain("runs/data", "runs/mini", preset="gpt-mini", overrides={"train.max_steps": 200})
    pretrain("runs/data", "runs/mini", resume=True, overrides={"train.max_steps": 400})   # continue it

Settings merge in order: the preset, the dotted `overrides` (on the command line also a --config
YAML file with `preset:`, `model:`, `train:`). A resumed run starts from its own `run.yaml`, so the
same command plus `resume=True` continues it; only a model setting that differs from the run's is
refused.

A new run with a time budget (`train.max_minutes`) and no preset is sized to it
(`lmforge.recipes.sizing`): the model shape, batch, learning rate, optimizer, schedule and steps come
from the corpus, the budget and the throughput measured on this machine, under the settings given;
`sizing=False` (`--no-sizing`) leaves the plain defaults.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig, TrainConfig, from_dict, load_run_config, settings
from lmforge.data import TokenShards
from lmforge.errors import UserError
from lmforge.models.decoder import Decoder, flops_per_token
from lmforge.recipes.sizing import Plan, Sizing, measure_throughput, plan_run
from lmforge.train.objectives import RandomWindows, bits_per_byte, evaluate_tokens
from lmforge.train.recipe import Job, Recipe, run_recipe


class Pretrain(Recipe):
    name = "pretrain"

    def __init__(self, data: str | Path, preset: str | None = None, overrides: dict[str, Any] | None = None,
                 sizing: Sizing | None = None):
        super().__init__()
        self.data, self.preset, self.overrides, self.sizing = data, preset, dict(overrides or {}), sizing

    def settings(self) -> dict[str, Any]:
        return {"data": str(Path(self.data).resolve())}

    def build(self) -> Job:
        shards = open_shards(self.data)
        base = None
        if self.resumed is not None and "model" in self.resumed:
            base = (from_dict(ModelConfig, self.resumed["model"], "run.yaml: model"),
                    from_dict(TrainConfig, self.resumed.get("train") or {}, "run.yaml: train"))
        overrides = self.overrides
        if base is None and self.preset is None and self.sizing is not None and "train.max_minutes" in overrides:
            plan = sized_run(shards, overrides["train.max_minutes"], self.sizing, given=overrides)
            overrides = {**plan.overrides(), **overrides}
        model_config, self.train = load_run_config(self.preset, None, overrides, base)
        if base is None or self.preset or any(k.startswith("model.") for k in self.overrides):
            model_config.vocab_size = shards.vocab_size
        if model_config.vocab_size < shards.vocab_size:
            raise UserError(f"the model's vocab_size ({model_config.vocab_size}) is smaller than the data's "
                            f"tokenizer ({shards.vocab_size} tokens)")
        self.model_config = model_config.validate()
        block, train = model_config.block_size, self.train
        for split in ("train", "val"):
            shards.check_length(split, block)
        torch.manual_seed(train.seed)
        model = Decoder(model_config)
        val_tokens, meta = shards.split("val"), shards.meta

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            result = evaluate_tokens(m, val_tokens, block, batch_size=train.batch_size,
                                     max_windows=train.eval_batches * train.batch_size)
            return {"val_loss": result["loss"],
                    "val_bpb": bits_per_byte(result["loss"], meta["val_tokens"], meta["val_bytes"])}

        return Job(model, RandomWindows(shards.split("train"), block, train.batch_size, train.seed),
                   evaluate=evaluate, tokenizer=shards.tokenizer,
                   info={"data": {"path": str(self.data), "fingerprint": meta["fingerprint"],
                                  "source": meta.get("source")}, "parameters": model.num_parameters()},
                   tokens_per_row=block, flops_per_token=flops_per_token(model_config, block))

    def report(self, trainer, summary: dict[str, Any]) -> dict[str, Any]:
        out = Path(summary["out"])
        return {**summary, "checkpoint": str(out / "checkpoint"), "loss_png": str(out / "loss.png")}

    def title(self, job: Job, out: Path) -> str:
        return f"{out.name}: {job.model.num_parameters():,} params"


@settings(model=ModelConfig, train=TrainConfig)
def pretrain(
    data: str | Path,
    out: str | Path,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    sizing: Sizing | bool = True,
) -> dict[str, Any]:
    """Pretrain a decoder-only LM on token shards; under torchrun, with DistributedDataParallel.

    Settings merge in order: the preset, the YAML of --config (`preset:`, `model:`, `train:`), the
    --model.FIELD / --train.FIELD flags (in Python: `overrides={"model.n_layer": 4, "train.lr": 3e-4}`).
    A resumed run starts from its own run.yaml: the same command plus --resume continues it exactly
    where its last checkpoint left it (train.* settings may extend it, e.g. more steps); a model
    setting that differs from the run's is refused. Returns the run's summary.

    Args:
        data: a directory written by lmforge prepare
        out: the run directory (run.yaml, metrics.jsonl, loss.png, checkpoint/)
        preset: the model preset (see lmforge models; default: gpt-mini's sizes)
        overrides: model.FIELD and train.FIELD settings
        resume: continue the run in --out from its last checkpoint
        sizing: with --train.max_minutes and no --preset, size the model, batch, learning rate, optimizer,
            schedule and steps to the budget and this machine's measured speed (--no-sizing: the defaults)
    """
    rules = Sizing() if sizing is True else sizing or None
    return run_recipe(Pretrain(data, preset, overrides, rules), out, resume)


def sized_run(shards: TokenShards, minutes: float, rules: Sizing, preset: str | None = None,
              given: dict[str, Any] | None = None) -> Plan:
    """The plan of a run of `minutes` on `shards` (its vocabulary fixed by their tokenizer) under the
    settings `given`, said on stderr (see `lmforge.recipes.sizing.plan_run`)."""
    corpus_bytes = shards.meta["train_bytes"] + shards.meta["val_bytes"]
    say(f"sizing the run to {minutes:g} minutes (measuring this machine's training throughput)")
    given = {k: v for k, v in (given or {}).items() if k not in ("model.vocab_size", "train.max_minutes")}
    plan = plan_run(corpus_bytes, minutes, shards.vocab_size, measure_throughput, rules, preset, given)
    block = min(plan.model.block_size, shards.num_tokens("train") - 1, shards.num_tokens("val") - 1)
    plan.model = replace(plan.model, block_size=block)
    say(plan.describe())
    return plan


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pretrained(summary: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    """What `lmforge pretrain` prints when it is done."""
    if "val_loss" not in summary:
        return None
    return (f"step {summary['step']}: val loss {summary['val_loss']:.4f}, {summary['val_bpb']:.4f} bits/byte; "
            f"checkpoint in {summary['checkpoint']}, loss curve in {summary['loss_png']}")


def open_shards(data: str | Path) -> TokenShards:
    path = Path(data)
    if not path.exists():
        raise UserError(f"no such data directory: {path} (make one with: lmforge prepare --data TEXT --out {path})")
    if not (path / "meta.json").is_file():
        raise UserError(f"{path} holds no prepared token shards (no meta.json); "
                        f"make them with: lmforge prepare --data {path} --out DIR")
    return TokenShards(path)
