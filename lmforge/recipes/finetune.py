"""The fine-tuning recipe: adapt a pretrained model to your data, fully or with LoRA.

    summary = finetune("smollm2-135m-instruct", "chats.jsonl", "runs/smol-lora", method="lora")
    finetune("smollm2-135m-instruct", "chats.jsonl", "runs/smol-lora", method="lora", resume=True)

The model is anything `lmforge.load` takes (a native checkpoint, a Hugging Face directory or hub id,
a GGUF file, a catalog name), or a model already in memory. The data is plain text, prompt/completion
JSONL or chat JSONL (`lmforge.data.sft`), records in memory, or a chat dataset of the catalog
(`chatterbot`: its train split, validated on its held-out split unless `val_data` is given); chat is
rendered with the model's chat template and only the assistant turns are learned. Validation loss
is measured before training and every epoch (or `train.eval_interval` steps), training stops early
when it stops improving (`patience`), and the best checkpoint is kept in `OUT/best`.
LoRA (through `peft`) trains small adapters and saves only them; `lmforge merge` folds them into
the weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.config import FinetuneTrainConfig, merge_settings, resolve_train, settings
from lmforge.data.batches import hold_out
from lmforge.data.datasets import CHAT_DATASETS, chat_dataset_file
from lmforge.data.sft import example_batches, load_examples
from lmforge.errors import UserError
from lmforge.train.objectives import causal_lm_loss, evaluate_examples, logits_causal_lm_loss
from lmforge.train.recipe import Job, Recipe, run_recipe, say

LORA_TARGETS = {"decoder": ["qkv", "proj", "up", "down"]}
DEFAULT_LR = {"lora": 2e-4, "full": 5e-5}


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float,
               target_modules: Sequence[str] | None = None) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft) on the named linear layers; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise UserError(f"--lora-rank = {rank}; expected a positive integer")
    if not 0 <= dropout < 1:
        raise UserError(f"--lora-dropout = {dropout}; expected a value in [0, 1)")
    kind = getattr(getattr(model, "config", None), "kind", None)
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                           if isinstance(m, torch.nn.Linear)})
    heads = ("lm_head", "embed_out", "head")
    targets = list(target_modules or LORA_TARGETS.get(kind) or [n for n in linear_names if n not in heads])
    unknown = [t for t in targets if t not in linear_names]
    if unknown:
        raise UserError(f"LoRA target modules {', '.join(unknown)} do not exist in this model; "
                        f"its linear layers are: {', '.join(linear_names)}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, config)  # the Trainer's kernels fuse its dropout (lmforge.kernels.lora_dropout)


def load_trainable(source: str | Path) -> tuple[torch.nn.Module, Any]:
    """The model to fine-tune and its loss: a native model, or a Hugging Face causal LM that has no
    native port (trained through transformers by the same Trainer; it is saved in its own format)."""
    from lmforge.interop import resolve_source
    from lmforge.models.hf import config_from_hf
    from lmforge.sources import load
    from lmforge.tokenizer import Tokenizer

    resolved = resolve_source(source)
    if resolved.kind == "hf":
        hf_config = json.loads((resolved.path / "config.json").read_text(encoding="utf-8"))
        try:
            config_from_hf(hf_config)
        except UserError as why:
            from transformers import AutoModelForCausalLM

            say(f"note: {why}; fine-tuning it as a transformers model")
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
            model.tokenizer = Tokenizer.from_hf(resolved.path)
            return model, logits_causal_lm_loss
    model = load(source, dequantize=True)  # a quantized model trains in float
    kind = getattr(model.config, "kind", "decoder")
    if kind != "decoder":
        raise UserError(f"{source} is a {kind} model; fine-tuning takes a decoder (causal LM)")
    return model, causal_lm_loss


def model_to_train(source: Any, name: str) -> tuple[torch.nn.Module, Any, int]:
    """The model to train (`source` loaded by `load_trainable`, or a model in memory), its loss function and
    its context length; a model without a tokenizer is refused."""
    if isinstance(source, torch.nn.Module):
        from lmforge.models.decoder import Decoder

        model, loss_fn = source, causal_lm_loss if isinstance(source, Decoder) else logits_causal_lm_loss
    else:
        model, loss_fn = load_trainable(source)
    if model.tokenizer is None:
        raise UserError(f"{name} has no tokenizer")
    config = model.config
    return model, loss_fn, getattr(config, "block_size", None) or getattr(config, "max_position_embeddings", 2048)


def describe_source(source: Any) -> str:
    """How a run records where its model or data came from: an absolute path, a name, or a count."""
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve()) if Path(source).exists() else str(source)
    return f"{len(source)} records" if isinstance(source, Sequence) else type(source).__name__


class Finetune(Recipe):
    name = "finetune"

    def __init__(self, model: Any, data: Any, method: str = "full", epochs: float | None = 3, val_data: Any = None,
                 val_fraction: float = 0.1, data_format: str = "auto", text_field: str = "text",
                 max_length: int | None = None, lora: dict[str, Any] | None = None, patience: int | None = None,
                 overrides: dict[str, Any] | None = None, base: str | None = None,
                 defaults: type[FinetuneTrainConfig] = FinetuneTrainConfig):
        super().__init__()
        if method not in ("full", "lora"):
            raise UserError(f"--method = {method!r}; expected full or lora")
        self.model, self.data, self.method, self.epochs = model, data, method, epochs
        self.val_data, self.val_fraction, self.data_format, self.text_field = val_data, val_fraction, data_format, \
            text_field
        self.max_length, self.patience, self.base = max_length, patience, base
        self.lora = {"rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": None, **(lora or {})}
        self.train_settings = merge_settings(defaults, overrides)
        if patience is not None:
            self.train_settings.patience = patience
        self.name_of_model = describe_source(base if base is not None else model)

    def settings(self) -> dict[str, Any]:
        return {"model": self.name_of_model, "data": describe_source(self.data), "method": self.method,
                "val_data": None if self.val_data is None else describe_source(self.val_data),
                "val_fraction": self.val_fraction, "data_format": self.data_format, "text_field": self.text_field,
                "max_length": self.max_length, "lora": self.lora if self.method == "lora" else None}

    def build(self) -> Job:
        data, val_data = self.data, self.val_data
        if isinstance(data, (str, Path)) and str(data) in CHAT_DATASETS and not Path(data).exists():
            val_data = val_data if val_data is not None else chat_dataset_file(str(data), "validation")
            data = chat_dataset_file(str(data), "train")
        model, loss_fn, context = model_to_train(self.model, self.name_of_model)
        tokenizer = model.tokenizer
        max_length = min(self.max_length or context, context)
        examples = load_examples(data, tokenizer, max_length, self.data_format, self.text_field)
        if val_data is not None:
            train, val = examples, load_examples(val_data, tokenizer, max_length, self.data_format, self.text_field)
        else:
            train, val = hold_out(examples, self.val_fraction, seed=0)
        self.train, steps_per_epoch = resolve_train(self.train_settings, len(train), self.epochs,
                                                    DEFAULT_LR[self.method])
        if self.method == "lora":
            torch.manual_seed(self.train.seed)  # the adapters' initial values: the same command, the same run
            lora = self.lora
            model = apply_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
        batch_size, pad_id = self.train.batch_size, tokenizer.eos_id

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            return {"val_loss": evaluate_examples(m, val, batch_size, pad_id, loss_fn=loss_fn)}

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(f"fine-tuning {self.name_of_model} ({self.method}: {trainable:,} of "
            f"{sum(p.numel() for p in model.parameters()):,} parameters train) on {len(train)} examples, "
            f"{len(val)} held out; {steps_per_epoch} steps per epoch")
        return Job(model, example_batches(train, batch_size, self.train.seed, pad_id), loss_fn=loss_fn,
                   evaluate=evaluate, tokenizer=tokenizer,
                   info={"base": self.name_of_model, "method": self.method, "data": describe_source(self.data),
                         "lora": self.settings()["lora"]},
                   tokens_per_row=sum(len(e.ids) for e in train) / len(train), steps_per_epoch=steps_per_epoch)

    def before(self, trainer) -> dict[str, Any]:
        loss = trainer.evaluate(trainer.model)["val_loss"]
        say(f"validation loss before: {loss:.4f}")
        return {"val_loss_before": round(loss, 6)}

    def title(self, job: Job, out: Path) -> str:
        return f"{Path(self.name_of_model).name} {self.method} fine-tuning"


@settings(train=FinetuneTrainConfig)
def finetune(
    model: str | Path | torch.nn.Module,
    data: str | Path | Sequence[dict],
    out: str | Path,
    method: Literal["full", "lora"] = "full",
    epochs: float | None = 3,
    val_data: str | Path | Sequence[dict] | None = None,
    val_fraction: float = 0.1,
    data_format: Literal["auto", "text", "prompt_completion", "chat"] = "auto",
    text_field: str = "text",
    max_length: int | None = None,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_targets: list[str] | None = None,
    patience: int | None = None,
    overrides: dict[str, Any] | None = None,
    base: str | None = None,
    resume: bool = False,
    defaults: type[FinetuneTrainConfig] = FinetuneTrainConfig,
) -> dict[str, Any]:
    """Fine-tune a pretrained model on your data (full or LoRA).

    MODEL is an lmforge checkpoint, a Hugging Face directory, a .gguf file, smollm2-135m-instruct, or a
    hub id; DATA is plain text, prompt/completion JSONL, chat JSONL ({"messages": [{"role", "content"},
    ...]}: the loss is on the assistant turns only) or a catalog chat dataset (chatterbot). Prints train
    and validation loss every epoch and keeps the best checkpoint in OUT/best. In Python, `model` may be a
    model in memory (with its tokenizer; `base` names where it came from) and `data`/`val_data` records in
    memory. Returns the summary (validation loss before training, best and final).

    Args:
        model: the pretrained model
        data: the training data (.txt/.md, .jsonl, .csv, .parquet; a file, folder or glob; or a catalog chat dataset)
        out: the run directory to create
        method: train all weights (full), or LoRA adapters
        epochs: passes over the data (sets train.max_steps unless that is given)
        val_data: validation data (default: the catalog's held-out split, or --val-fraction of DATA)
        val_fraction: the share of DATA held out for validation when there is no --val-data
        data_format: the data's shape (default: detected from the first record)
        text_field: the field / column of plain text
        max_length: cut examples to this many tokens (default: the model's context)
        lora_rank: the rank of the LoRA adapters
        lora_alpha: LoRA's scale numerator (the update is scaled by alpha / rank)
        lora_dropout: dropout on the adapters' input
        lora_targets: names of the linear layers to adapt (default: all of attention and MLP)
        patience: stop after this many evaluations without a better validation loss (train.patience)
        overrides: train.FIELD settings
        base: where an in-memory model came from (recorded; LoRA adapters are loaded onto it)
        resume: continue the run in --out after a stop or a kill (the same command; train.* may change)
        defaults: the dataclass of the train settings' defaults (another verb's, e.g. TaskFromScratchTrainConfig)
    """
    lora = {"rank": lora_rank, "alpha": float(lora_alpha), "dropout": lora_dropout,
            "targets": list(lora_targets) if lora_targets else None}
    recipe = Finetune(model, data, method, epochs, val_data, val_fraction, data_format, text_field, max_length,
                      lora, patience, overrides, base, defaults)
    return run_recipe(recipe, out, resume)


def finetuned(summary: dict[str, Any], arguments: dict[str, Any]) -> str:
    """What `lmforge finetune` prints when it is done."""
    before = f"{summary['val_loss_before']:.4f} before, " if "val_loss_before" in summary else ""
    return (f"validation loss {before}{summary.get('best_val_loss', float('nan')):.4f} at best; "
            f"the best checkpoint is in {arguments['out']}/best")
