"""The classifier recipe: a linear head on a decoder's last real token, trained fully or with LoRA.

    summary = train_classifier("smollm2-135m-instruct", "rotten_tomatoes", "runs/rt", method="lora", epochs=1)
    train_classifier("smollm2-135m-instruct", "rotten_tomatoes", "runs/rt", method="lora", resume=True)

Texts are right-padded and attention is causal, so padding never reaches the last real token whose
hidden state the head reads. The head always trains; the backbone trains fully or through LoRA
adapters (`lmforge.recipes.finetune.apply_lora`), optionally only those of the last N blocks. The
validation loss and accuracy are measured before training and every epoch, training stops early
when they stop improving, and the best checkpoint is kept in OUT/best.

A classifier checkpoint is an ordinary checkpoint directory of its backbone (`model.safetensors`,
or LoRA's `adapter_model.safetensors` naming its `base` in lmforge.json) plus the head:
`classifier.safetensors` (`weight` (n_labels, d_model), `bias`) and `classifier.json` (the label
names in head order, the pooling, the maximum length). `lmforge.load` on it gives the backbone LM.
Data is a catalog dataset (`rotten_tomatoes`, through `lmforge.data.load(name, split)`), a local
.jsonl or .csv file with a text and a label column, or a list of such records in memory.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmforge import crypto
from lmforge.config import ClassifyTrainConfig, merge_settings, resolve_train, settings
from lmforge.data.batches import EpochBatches, hold_out
from lmforge.errors import UserError
from lmforge.infer import pad_right
from lmforge.recipes.finetune import apply_lora, describe_source
from lmforge.train.checkpoint import save_tensors
from lmforge.train.recipe import Job, Recipe, run_recipe, say

HEAD_WEIGHTS, HEAD_CONFIG = "classifier.safetensors", "classifier.json"
DEFAULT_MAX_LENGTH = 128
DEFAULT_LR = {"lora": 5e-4, "full": 5e-5}

Records = Sequence[dict[str, Any]]
Augment = Callable[[str, random.Random], str]  # (text, rng) -> a changed text, e.g. lmforge.data.augment.Augmenter


# ----------------------------------------------------------------------------------------------
# data: labelled texts from the catalog, local files or memory


@dataclass(frozen=True)
class LabelledText:
    """One example: where it came from (`file.jsonl:LINE`), its text and its gold label."""

    name: str
    text: str
    label: str


def read_labelled(source: str | Path | Records, split: str = "train", text_field: str = "text",
                  label_field: str = "label") -> list[LabelledText]:
    """Labelled texts from a catalog dataset's `split`, a .jsonl/.csv file, or records in memory.

    A record without the label field or with empty text is an error naming the file and line.
    """
    if isinstance(source, (str, Path)):
        from lmforge.data import load

        where = f"{source}[{split}]" if not Path(source).exists() else str(source)
        records = [(f"{where} record {i}", r) for i, r in enumerate(load(source, split), start=1)]
    else:
        records, where = [(f"record {i}", r) for i, r in enumerate(source, start=1)], "records"
    if not records:
        raise UserError(f"{where} holds no records")
    examples = []
    for name, record in records:
        if not isinstance(record, dict):
            raise UserError(f"{name}: expected an object with fields {text_field!r} and {label_field!r}")
        for field in (text_field, label_field):
            if field not in record or record[field] is None:
                raise UserError(f"{name}: no field {field!r} (fields: {', '.join(map(str, record)) or 'none'}); "
                                f"pass --text-field / --label-field")
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{name}: empty text in field {text_field!r}; every example needs text")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            raise UserError(f"{name}: label {label!r} in field {label_field!r}; expected a non-empty string or integer")
        examples.append(LabelledText(name, text, str(label).strip()))
    return examples


def label_names(examples: Sequence[LabelledText], where: str) -> list[str]:
    """The sorted label names of training data, which must hold at least two classes."""
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise UserError(f"{where}: every example has the label {labels[0]!r}; a classifier needs at least 2 classes")
    return labels


def check_known_labels(examples: Sequence[LabelledText], labels: Sequence[str]) -> None:
    known = set(labels)
    for e in examples:
        if e.label not in known:
            raise UserError(f"{e.name}: label {e.label!r} is not one the classifier knows ({', '.join(labels)})")



# ----------------------------------------------------------------------------------------------
# the model: a decoder and a linear head on its last real token


def encode_batch(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, cut to its first `max_length` tokens (at least one token each)."""
    ids = [row[:max_length] for row in tokenizer.encode_batch(list(texts))]
    return [row or [tokenizer.eos_id] for row in ids]


def last_token_states(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The hidden state (B, d) of each row's last real token, from `hidden` (B, T, d) of right-padded rows."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


class Classifier(nn.Module):
    """A decoder `backbone` (a native Decoder, or one wrapped with LoRA) with a linear head over `labels`."""

    def __init__(self, backbone: nn.Module, labels: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__()
        self.backbone = backbone
        self.labels = list(labels)
        self.max_length = max_length
        self.head = nn.Linear(backbone.config.d_model, len(self.labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Label logits (B, n_labels) for right-padded token ids (B, T) with real `lengths` (B,)."""
        pooled = last_token_states(self.backbone.hidden_states(ids), lengths)
        return self.head(pooled.to(self.head.weight.dtype))

    @torch.no_grad()
    def features(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """What the head reads (N, d_model): each text's last real token's hidden state, in the head's dtype, on
        the head's device; the label scores are `self.head(features)`."""
        self.eval()
        device = self.head.weight.device
        rows = encode_batch(self.tokenizer, texts, self.max_length)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
        out = torch.empty(len(rows), self.head.in_features, dtype=self.head.weight.dtype, device=device)
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, unit="batch", desc="classify"):
            picks = order[start:start + batch_size]
            ids, mask = pad_right([rows[i] for i in picks], self.tokenizer.eos_id, device)
            pooled = last_token_states(self.backbone.hidden_states(ids), mask.sum(1))
            out[torch.tensor(picks, device=device)] = pooled.to(out.dtype)
        return out

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Label probabilities (N, n_labels) of `texts`, in `labels` order."""
        return self.head(self.features(texts, batch_size, progress)).float().softmax(-1).cpu()

    def save_head(self, directory: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write the head and the labels into a checkpoint being written; return the backbone's weights.

        Called by `save_checkpoint`, which then saves the backbone (full weights or LoRA adapters) as usual.
        """
        save_tensors({"weight": weights["head.weight"], "bias": weights["head.bias"]}, directory / HEAD_WEIGHTS)
        config = {"labels": self.labels, "pooling": "last_token", "max_length": self.max_length}
        crypto.write_bytes(directory / HEAD_CONFIG, json.dumps(config, indent=2) + "\n")  # encrypted with the rest
        return {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}


# ----------------------------------------------------------------------------------------------
# training with the one Trainer


def labelled_batches(texts: Sequence[str], targets: Sequence[int], tokenizer: Any, batch_size: int, seed: int,
                     max_length: int, augment: Augment | None = None) -> EpochBatches:
    """Shuffled epochs of (ids, lengths, labels); the batch of a step depends only on (seed, step).

    With `augment`, each text is changed afresh every time it is drawn (rng seeded by seed, step, part).
    """
    ids = None if augment else encode_batch(tokenizer, texts, max_length)

    def collate(picks: list[int], step: int, part: int) -> dict[str, torch.Tensor]:
        if augment is None:
            rows = [ids[i] for i in picks]
        else:
            rng = random.Random(f"{seed}-{step}-{part}")
            rows = encode_batch(tokenizer, [augment(texts[i], rng) for i in picks], max_length)
        padded, mask = pad_right(rows, tokenizer.eos_id)
        return {"ids": padded, "lengths": mask.sum(1), "labels": torch.tensor([targets[i] for i in picks])}

    return EpochBatches(range(len(texts)), batch_size, seed, collate)


def freeze_lower_adapters(model: nn.Module, trained_layers: int) -> None:
    """Keep only the LoRA adapters of the last `trained_layers` blocks trainable (the others stay a no-op)."""
    n_layer = model.config.n_layer
    if not 1 <= trained_layers <= n_layer:
        raise UserError(f"--lora-layers = {trained_layers}; expected 1 to {n_layer} (the model's blocks)")
    for name, p in model.named_parameters():
        block = re.search(r"\.blocks\.(\d+)\.", name)
        if "lora_" in name and block and int(block.group(1)) < n_layer - trained_layers:
            p.requires_grad_(False)


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the label logits (the objective the Trainer runs for classifiers)."""
    return F.cross_entropy(model(batch["ids"], batch["lengths"]).float(), batch["labels"])


@torch.no_grad()
def validation_scores(model: Classifier, texts: Sequence[str], targets: Sequence[int],
                      batch_size: int) -> dict[str, float]:
    """Mean cross-entropy and accuracy on held-out examples."""
    probabilities = model.probabilities(texts, batch_size)
    gold = torch.tensor(list(targets))
    loss = F.nll_loss(probabilities.clamp_min(1e-12).log(), gold).item()
    accuracy = (probabilities.argmax(-1) == gold).float().mean().item()
    return {"val_loss": loss, "val_accuracy": accuracy}


class TrainClassifier(Recipe):
    name = "classify"

    def __init__(self, model: Any, data: Any, method: str = "lora", epochs: float | None = 3, val_data: Any = None,
                 val_fraction: float = 0.1, text_field: str = "text", label_field: str = "label",
                 max_length: int = DEFAULT_MAX_LENGTH, lora: dict[str, Any] | None = None,
                 lora_layers: int | None = None, patience: int | None = None, augment: float | None = None,
                 overrides: dict[str, Any] | None = None):
        super().__init__()
        if method not in ("full", "lora"):
            raise UserError(f"--method = {method!r}; expected full or lora")
        if max_length < 1:
            raise UserError(f"--max-length = {max_length}; expected a positive integer")
        self.model, self.data, self.method, self.epochs, self.val_data = model, data, method, epochs, val_data
        self.val_fraction, self.text_field, self.label_field = val_fraction, text_field, label_field
        self.max_length, self.lora_layers, self.augment = max_length, lora_layers, augment
        self.lora = {"rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": None, **(lora or {})}
        self.train_settings = merge_settings(ClassifyTrainConfig, overrides)
        if patience is not None:
            self.train_settings.patience = patience

    def settings(self) -> dict[str, Any]:
        return {"model": describe_source(self.model), "data": describe_source(self.data), "method": self.method,
                "val_data": None if self.val_data is None else describe_source(self.val_data),
                "val_fraction": self.val_fraction, "text_field": self.text_field, "label_field": self.label_field,
                "max_length": self.max_length, "lora": self.lora if self.method == "lora" else None,
                "lora_layers": self.lora_layers, "augment": self.augment}

    def build(self) -> Job:
        from lmforge.data.quality import clean_training_records
        from lmforge.sources import load

        data, val_data = self.data, self.val_data
        train = read_labelled(data, "train", self.text_field, self.label_field)
        if val_data is None and isinstance(data, (str, Path)) and not Path(data).exists():
            val_data = data  # a catalog dataset: its own validation split
        if val_data is not None:
            val = read_labelled(val_data, "validation", self.text_field, self.label_field)
        else:
            train, val = hold_out(train, self.val_fraction, seed=0)
        labels = label_names(train, str(data) if isinstance(data, (str, Path)) else "the training records")
        check_known_labels(val, labels)
        index = {label: i for i, label in enumerate(labels)}
        records, _ = clean_training_records([{"text": e.text, "i": i} for i, e in enumerate(train)],
                                            [e.text for e in val])
        train = [replace(train[r["i"]], text=r["text"]) for r in records]

        backbone = load(self.model, dequantize=True)  # a quantized model trains in float
        tokenizer = backbone.tokenizer
        if tokenizer is None or not hasattr(backbone, "hidden_states"):
            raise UserError(f"{self.model}: expected a decoder with a tokenizer (a checkpoint or a model "
                            f"lmforge.load takes)")
        max_length = min(self.max_length, backbone.config.block_size)
        self.train, steps_per_epoch = resolve_train(self.train_settings, len(train), self.epochs,
                                                    DEFAULT_LR[self.method])
        torch.manual_seed(self.train.seed)
        if self.method == "lora":
            lora = self.lora
            backbone = apply_lora(backbone, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
            if self.lora_layers is not None:
                freeze_lower_adapters(backbone, self.lora_layers)
        classifier = Classifier(backbone, labels, max_length)
        batch_size = self.train.batch_size
        val_texts, val_targets = [e.text for e in val], [index[e.label] for e in val]

        def evaluate(m: nn.Module) -> dict[str, float]:
            return validation_scores(m, val_texts, val_targets, batch_size=2 * batch_size)

        texts = [e.text for e in train]
        augmenter = None
        if self.augment is not None:
            from lmforge.data.augment import Augmenter

            augmenter = Augmenter(self.augment, self.augment, self.augment, self.augment)
        batches = labelled_batches(texts, [index[e.label] for e in train], tokenizer, batch_size, self.train.seed,
                                   max_length, augmenter)
        trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
        say(f"training a {len(labels)}-label classifier ({', '.join(labels)}) on {self.model} ({self.method}: "
            f"{trainable:,} of {sum(p.numel() for p in classifier.parameters()):,} parameters train), "
            f"{len(train)} examples, {len(val)} held out; {steps_per_epoch} steps per epoch")
        self.labels, self.trainable = labels, trainable
        sample = encode_batch(tokenizer, texts[:256], max_length)
        return Job(classifier, batches, loss_fn=classification_loss, evaluate=evaluate, tokenizer=tokenizer,
                   info={"task": "classify", "base": describe_source(self.model), "method": self.method,
                         "labels": labels, "data": describe_source(data) if isinstance(data, (str, Path))
                         else f"{len(train)} records", "text_field": self.text_field,
                         "label_field": self.label_field, "augment": self.augment is not None,
                         "lora": self.settings()["lora"]},
                   tokens_per_row=sum(len(r) for r in sample) / len(sample), steps_per_epoch=steps_per_epoch)

    def before(self, trainer) -> dict[str, Any]:
        return {"val_accuracy_before": round(trainer.evaluate(trainer.model)["val_accuracy"], 6)}

    def report(self, trainer, summary: dict[str, Any]) -> dict[str, Any]:
        return {**summary, "labels": self.labels, "method": self.method, "trainable_parameters": self.trainable}

    def title(self, job: Job, out: Path) -> str:
        return f"{Path(str(self.model)).name} {self.method} classifier"


@settings(train=ClassifyTrainConfig)
def train_classifier(
    model: str | Path,
    data: str | Path | Records,
    out: str | Path,
    method: Literal["full", "lora"] = "lora",
    epochs: float | None = 3,
    val_data: str | Path | Records | None = None,
    val_fraction: float = 0.1,
    text_field: str = "text",
    label_field: str = "label",
    max_length: int = DEFAULT_MAX_LENGTH,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_targets: list[str] | None = None,
    lora_layers: int | None = None,
    patience: int | None = None,
    augment: float | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a classification head on a decoder (full or LoRA).

    Prints train/validation loss and validation accuracy every epoch and keeps the best checkpoint in
    OUT/best. Validation: --val-data; else a catalog dataset's validation split; else --val-fraction of
    DATA held out. Returns the Trainer's summary plus the validation accuracy before training.

    Args:
        model: the decoder: a checkpoint, Hugging Face directory, .gguf file or catalog model
        data: labelled texts: a catalog dataset (rotten_tomatoes) or a .jsonl/.csv file with text and label
            columns (in Python also records in memory)
        out: the run directory to create
        method: train all weights (full), or LoRA adapters; the head always trains
        epochs: passes over the data (sets train.max_steps unless that is given)
        val_data: validation data (default: the catalog's validation split, or --val-fraction of DATA)
        val_fraction: the share of DATA held out when there is neither --val-data nor a catalog split
        text_field: the field / column of the text
        label_field: the field / column of the label
        max_length: tokens per text; longer ones are cut
        lora_rank: the rank of the LoRA adapters
        lora_alpha: LoRA's scale numerator (the update is scaled by alpha / rank)
        lora_dropout: dropout on the adapters' input
        lora_targets: linear layers to adapt (default: attention and MLP)
        lora_layers: adapt only the last N blocks: the gradient stops there, so a step costs about a forward
            pass plus N blocks of backward pass (default: all)
        patience: stop after this many evaluations without a better validation loss (train.patience)
        augment: EDA on the fly: every text drawn for training gets one EDA operation (synonyms, insertion,
            swap, deletion) at this rate, e.g. 0.1
        overrides: train.FIELD settings
        resume: continue the run in --out after a stop or a kill (the same command; train.* may change)
    """
    lora = {"rank": lora_rank, "alpha": float(lora_alpha), "dropout": lora_dropout,
            "targets": list(lora_targets) if lora_targets else None}
    recipe = TrainClassifier(model, data, method, epochs, val_data, val_fraction, text_field, label_field,
                             max_length, lora, lora_layers, patience, augment, overrides)
    return run_recipe(recipe, out, resume)


def trained(summary: dict[str, Any], arguments: dict[str, Any]) -> str:
    """What `lmforge classify train` prints when it is done."""
    before = f"{summary['val_accuracy_before']:.4f} before, " if "val_accuracy_before" in summary else ""
    return (f"validation accuracy {before}{summary['val_accuracy']:.4f} after; the best checkpoint is in "
            f"{arguments['out']}/best")
