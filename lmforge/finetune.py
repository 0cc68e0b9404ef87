"""`lmforge finetune`: adapt a pretrained model to your data, fully or with LoRA, with the one Trainer.

    lmforge finetune runs/x chats.jsonl --out runs/x-chat --method lora --epochs 3
    summary = finetune("smollm2-135m-instruct", "chats.jsonl", "runs/smol-lora", method="lora")

The model is anything `lmforge.load` takes (a native checkpoint, a Hugging Face directory or hub id,
a GGUF file, a catalog name). The data is plain text, prompt/completion JSONL or chat JSONL
(`lmforge.data.sft`), or a chat dataset of the catalog (`chatterbot`: its train split, validated on
its held-out split unless `val_data` is given; see `lmforge.data.catalog.CHAT_CATALOG`); chat is
rendered with the model's chat template and only the assistant turns are learned. Validation loss
is measured every epoch (or `--train.eval_interval` steps), training stops early when it stops
improving (`patience`), and the best checkpoint is kept in `OUT/best`.
LoRA (through `peft`) trains small adapters and saves only them; `lmforge merge` folds them into
the weights.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import TrainConfig, fill_epoch_settings, from_dict
from lmforge.data.catalog import CHAT_CATALOG, chat_dataset_file
from lmforge.data.sft import ExampleBatches, load_examples
from lmforge.errors import UserError
from lmforge.files import check_new_directory

LORA_TARGETS = {"decoder": ["qkv", "proj", "up", "down"]}


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A fixed random share of the examples for validation (at least one, when there are two or more)."""
    if len(examples) < 2:
        raise UserError(f"only {len(examples)} example(s): need at least 2 to hold one out for validation "
                        f"(or pass --val-data)")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float,
               target_modules: Sequence[str] | None = None) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft) on the named linear layers; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    from lmforge.train.lora import fuse_lora_dropout

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
    peft_model = get_peft_model(model, config)
    # the same dropout, but its mask is drawn again in the backward pass instead of kept with a copy
    # of each adapted layer's input (lmforge.train.lora)
    fuse_lora_dropout(peft_model)
    return peft_model


def load_trainable(source: str | Path) -> tuple[torch.nn.Module, Any]:
    """The model to fine-tune and its loss: a native model, or a Hugging Face causal LM that has no
    native port (trained through transformers by the same Trainer; it is saved in its own format)."""
    from lmforge.api import load
    from lmforge.models.convert import config_from_hf, resolve_source
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.objectives import causal_lm_loss, logits_causal_lm_loss

    resolved = resolve_source(source)
    if resolved.kind == "hf":
        hf_config = json.loads((resolved.path / "config.json").read_text(encoding="utf-8"))
        try:
            config_from_hf(hf_config)
        except UserError as why:
            from transformers import AutoModelForCausalLM

            print(f"note: {why}; fine-tuning it as a transformers model", file=sys.stderr)
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
            model.tokenizer = Tokenizer.from_hf(resolved.path)
            return model, logits_causal_lm_loss
    model = load(source)
    kind = getattr(model.config, "kind", "decoder")
    if kind != "decoder":
        raise UserError(f"{source} is a {kind} model; fine-tuning takes a decoder (causal LM)")
    return model, causal_lm_loss


def finetune(
    model: str | Path | torch.nn.Module,
    data: str | Path | Sequence[dict],
    out: str | Path,
    method: str = "full",
    epochs: float | None = 3,
    val_data: str | Path | Sequence[dict] | None = None,
    val_fraction: float = 0.1,
    data_format: str = "auto",
    text_field: str = "text",
    max_length: int | None = None,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_targets: Sequence[str] | None = None,
    patience: int | None = None,
    overrides: dict[str, Any] | None = None,
    base: str | None = None,
) -> dict[str, Any]:
    """Fine-tune `model` on `data` into `out`; return the summary (best and final validation loss).

    `model` may also be a model already in memory (with its `tokenizer`): one `load_trainable` gave,
    with `base` naming where it came from (LoRA adapters are loaded onto it), or a fresh Decoder to
    train from scratch. `data` and `val_data` may be records already in memory (dicts of one shape).
    """
    from lmforge.train.objectives import causal_lm_loss, evaluate_examples, logits_causal_lm_loss
    from lmforge.train.trainer import Trainer

    out = Path(out)
    check_new_directory(out)
    if method not in ("full", "lora"):
        raise UserError(f"--method = {method!r}; expected full or lora")
    in_memory = isinstance(model, torch.nn.Module)
    name = base or (type(model).__name__ if in_memory else str(model))
    if isinstance(data, (str, Path)) and str(data) in CHAT_CATALOG and not Path(data).exists():
        # a catalog chat dataset, with its own split
        val_data = val_data if val_data is not None else chat_dataset_file(str(data), "validation")
        data = chat_dataset_file(str(data), "train")
    if in_memory:
        from lmforge.models.decoder import Decoder

        base_model, loss_fn = model, causal_lm_loss if isinstance(model, Decoder) else logits_causal_lm_loss
    else:
        base_model, loss_fn = load_trainable(model)
    tokenizer = base_model.tokenizer
    if tokenizer is None:
        raise UserError(f"{model} has no tokenizer")
    config = base_model.config
    context = getattr(config, "block_size", None) or getattr(config, "max_position_embeddings", None) or 2048
    max_length = min(max_length or context, context)
    examples = load_examples(data, tokenizer, max_length, data_format, text_field)
    if val_data is not None:
        train_examples, val_examples = examples, load_examples(val_data, tokenizer, max_length, data_format, text_field)
    else:
        train_examples, val_examples = split_examples(examples, val_fraction, seed=0)

    settings = {"lr": 2e-4 if method == "lora" else 5e-5, "min_lr": 0.0, "warmup_steps": 0, "weight_decay": 0.0,
                "batch_size": 8, "eval_batches": 1, "log_interval": 1}
    settings.update({k.removeprefix("train."): v for k, v in (overrides or {}).items()})
    batch_size = settings["batch_size"]
    steps_per_epoch = fill_epoch_settings(settings, len(train_examples), epochs)
    if patience is not None:
        settings["patience"] = patience
    settings["keep_best"] = True
    train_config = from_dict(TrainConfig, settings, "train").validate()

    trained = base_model
    if method == "lora":
        trained = apply_lora(base_model, lora_rank, lora_alpha, lora_dropout, lora_targets)
    pad_id = tokenizer.eos_id
    device = next(base_model.parameters()).device

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"val_loss": evaluate_examples(m, val_examples, batch_size, pad_id, device, loss_fn)}

    n_train_tokens = sum(len(e.ids) for e in train_examples)
    trainer = Trainer(
        trained, train_config, out,
        batches=ExampleBatches(train_examples, batch_size, train_config.seed, pad_id, device),
        evaluate=evaluate, loss_fn=loss_fn, tokenizer=tokenizer,
        info={"base": str(Path(name).resolve()) if Path(name).exists() else name, "method": method,
              "data": str(data) if isinstance(data, (str, Path)) else f"{len(data)} records",
              "lora": {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout} if method == "lora" else None},
        tokens_per_row=n_train_tokens / len(train_examples),
        steps_per_epoch=steps_per_epoch,
    )
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trained.parameters())
    print(f"fine-tuning {name} ({method}: {trainable:,} of {total:,} parameters train) on "
          f"{len(train_examples)} examples, {len(val_examples)} held out; {steps_per_epoch} steps per epoch",
          file=sys.stderr)
    before = evaluate(trainer.model)["val_loss"]
    print(f"validation loss before: {before:.4f}", file=sys.stderr)
    summary = trainer.fit()
    summary = {**summary, "val_loss_before": round(before, 6), "out": str(out)}
    return trainer.finish(summary, title=f"{Path(name).name} {method} fine-tuning")
