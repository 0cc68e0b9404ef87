"""`lmforge classify`: text classification with a decoder: a trained head, or zero-shot label words.

    summary = train_classifier("smollm2-135m-instruct", "rotten_tomatoes", "runs/rt", method="lora", epochs=1)
    classifier = load_classifier("runs/rt")                # OUT/best: backbone (or adapters) + head + labels
    predict(classifier, ["A gorgeous, witty film."])       # [{"label": "fresh", "probabilities": {...}}]
    evaluate_classifier("runs/rt", "rotten_tomatoes", "runs/rt-eval")   # report vs TF-IDF + LR, confusion PNG
    zero_shot("smollm2-135m-instruct", texts, {"fresh": "positive", "rotten": "negative"})

The classifier is a linear head on the hidden state of the last real token of the text (texts are
right-padded and attention is causal, so padding never reaches that token). It trains with the one
Trainer, fully or with LoRA adapters (`lmforge.finetune.apply_lora`; the head always trains), with
a validation loss and accuracy every epoch, early stopping, and the best checkpoint kept in OUT/best.

A classifier checkpoint is an ordinary checkpoint directory of its backbone (`model.safetensors`,
or LoRA's `adapter_model.safetensors` naming its `base` in lmforge.json) plus the head:
`classifier.safetensors` (`weight` (n_labels, d_model), `bias`) and `classifier.json` (the label
names in head order, the pooling, the maximum length). `lmforge.load` on it gives the backbone LM.

Data is a catalog dataset (`rotten_tomatoes`, through `lmforge.data.load(name, split)`), a local
.jsonl or .csv file with a text and a label column, or a list of such records in memory.
Zero-shot classification needs no training: each label has a verbaliser word, and the label whose
word the LM finds most likely after a prompt wins (probabilities: a softmax over the word scores).
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lmforge.data.sft import pad_right
from lmforge.errors import UserError
from lmforge.files import check_new_directory

HEAD_WEIGHTS, HEAD_CONFIG = "classifier.safetensors", "classifier.json"
DEFAULT_MAX_LENGTH = 128
DEFAULT_TEMPLATE = "Text: {text}\nLabel:"  # 0.67 on 200 rotten_tomatoes validation texts with SmolLM2-135M

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


def read_texts(source: str | Path, text_field: str = "text") -> list[str]:
    """Texts to classify: one per line of a .txt file, or the `text_field` of each record of a file
    `lmforge.data.load` reads (.jsonl, .csv, .parquet)."""
    from lmforge.data import load

    path = Path(source)
    if not path.is_file():
        raise UserError(f"no such file: {path} (expected a .txt, .jsonl or .csv file of texts)")
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [(f"{path.name}:{n}", {text_field: line}) for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        records = [(f"{path.name} record {i}", r) for i, r in enumerate(load(path), start=1)]
    texts = []
    for name, record in records:
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{name}: no text in field {text_field!r}; pass --text-field")
        texts.append(text)
    if not texts:
        raise UserError(f"{path} holds no texts")
    return texts


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
    def probabilities(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Label probabilities (N, n_labels) of `texts`, in `labels` order."""
        self.eval()
        device = self.head.weight.device
        rows = encode_batch(self.tokenizer, texts, self.max_length)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
        out = torch.empty(len(rows), len(self.labels))
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, unit="batch", desc="classify"):
            picks = order[start:start + batch_size]
            ids, mask = pad_right([rows[i] for i in picks], self.tokenizer.eos_id, device)
            lengths = mask.sum(1)
            out[picks] = self(ids, lengths).float().softmax(-1).cpu()
        return out

    def save_head(self, directory: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write the head and the labels into a checkpoint being written; return the backbone's weights.

        Called by `save_checkpoint`, which then saves the backbone (full weights or LoRA adapters) as usual.
        """
        save_file({"weight": weights["head.weight"], "bias": weights["head.bias"]}, directory / HEAD_WEIGHTS)
        config = {"labels": self.labels, "pooling": "last_token", "max_length": self.max_length}
        (directory / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A trained classifier from its checkpoint directory, or the `best/` checkpoint of its run directory."""
    import lmforge.api
    from lmforge.train.checkpoint import resolve_checkpoint

    directory = resolve_checkpoint(path)
    if not (directory / HEAD_CONFIG).is_file() or not (directory / HEAD_WEIGHTS).is_file():
        raise UserError(f"{directory} is not a classifier ({HEAD_CONFIG} or {HEAD_WEIGHTS} is missing); "
                        f"train one with: lmforge classify train MODEL DATA --out DIR")
    config = json.loads((directory / HEAD_CONFIG).read_text(encoding="utf-8"))
    classifier = Classifier(lmforge.api.load(directory), config["labels"], config.get("max_length", DEFAULT_MAX_LENGTH))
    head = load_file(directory / HEAD_WEIGHTS)
    classifier.head.load_state_dict(head)
    return classifier.to(device).eval()


def predict(classifier: Classifier | str | Path, texts: Sequence[str], batch_size: int = 32,
            progress: bool = False) -> list[dict[str, Any]]:
    """`{"label": best label, "probabilities": {label: p}}` for each text."""
    if isinstance(classifier, (str, Path)):
        classifier = load_classifier(classifier)
    empty = [i for i, t in enumerate(texts) if not str(t).strip()]
    if empty:
        raise UserError(f"text {empty[0] + 1} is empty; every text to classify needs some words")
    probabilities = classifier.probabilities(texts, batch_size, progress)
    return [{"label": classifier.labels[int(p.argmax())],
             "probabilities": {label: round(float(v), 6) for label, v in zip(classifier.labels, p)}}
            for p in probabilities]


# ----------------------------------------------------------------------------------------------
# training with the one Trainer


class LabelledBatches:
    """Shuffled epochs of (ids, lengths, labels); the batch of a step depends only on (seed, step).

    With `augment`, each text is changed afresh every time it is drawn (rng seeded by seed, step, row).
    """

    def __init__(self, texts: Sequence[str], targets: Sequence[int], tokenizer: Any, batch_size: int, seed: int,
                 max_length: int, augment: Augment | None = None, device: torch.device | str = "cpu"):
        self.texts, self.targets, self.tokenizer = list(texts), list(targets), tokenizer
        self.batch_size, self.seed, self.max_length, self.augment = batch_size, seed, max_length, augment
        self.device = torch.device(device)
        self.ids = None if augment else encode_batch(tokenizer, self.texts, max_length)
        self.steps_per_epoch = max(1, len(self.texts) // batch_size)

    def __call__(self, step: int, part: int, rows: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.texts))
        start = index * self.batch_size + part * rows
        picks = [int(order[i % len(order)]) for i in range(start, start + rows)]
        if self.augment is None:
            token_rows = [self.ids[i] for i in picks]
        else:
            rng = random.Random(f"{self.seed}-{step}-{part}")
            token_rows = encode_batch(self.tokenizer, [self.augment(self.texts[i], rng) for i in picks],
                                      self.max_length)
        ids, mask = pad_right(token_rows, self.tokenizer.eos_id, self.device)
        lengths = mask.sum(1)
        labels = torch.tensor([self.targets[i] for i in picks], dtype=torch.long, device=self.device)
        return {"ids": ids, "lengths": lengths, "labels": labels}


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


def train_classifier(
    model: str | Path,
    data: str | Path | Records,
    out: str | Path,
    method: str = "lora",
    epochs: float | None = 3,
    val_data: str | Path | Records | None = None,
    val_fraction: float = 0.1,
    text_field: str = "text",
    label_field: str = "label",
    max_length: int = DEFAULT_MAX_LENGTH,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_targets: Sequence[str] | None = None,
    lora_layers: int | None = None,
    patience: int | None = None,
    augment: Augment | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a classification head on `model` (all weights, or LoRA adapters + head) into `out`.

    Validation: `val_data`; else a catalog dataset's `validation` split; else `val_fraction` of `data`
    held out. `lora_layers=N` trains the adapters of the last N blocks only: the gradient then stops
    there, so a step costs about a forward pass plus N blocks of backward pass.
    Returns the Trainer's summary plus the validation accuracy before training.
    """
    import lmforge.api
    from lmforge.config import TrainConfig, fill_epoch_settings, from_dict
    from lmforge.finetune import apply_lora, split_examples
    from lmforge.train.trainer import Trainer

    out = Path(out)
    check_new_directory(out)
    if method not in ("full", "lora"):
        raise UserError(f"--method = {method!r}; expected full or lora")
    if max_length < 1:
        raise UserError(f"--max-length = {max_length}; expected a positive integer")
    train_examples = read_labelled(data, "train", text_field, label_field)
    if val_data is None and isinstance(data, (str, Path)) and not Path(data).exists():
        val_data = data  # a catalog dataset: its own validation split
    if val_data is not None:
        val_examples = read_labelled(val_data, "validation", text_field, label_field)
    else:
        train_examples, val_examples = split_examples(train_examples, val_fraction, seed=0)
    labels = label_names(train_examples, str(data) if isinstance(data, (str, Path)) else "the training records")
    check_known_labels(val_examples, labels)
    index = {label: i for i, label in enumerate(labels)}
    from lmforge.data.quality import clean_training_records

    train_records, _ = clean_training_records([{"text": e.text, "i": i} for i, e in enumerate(train_examples)],
                                              [e.text for e in val_examples])
    train_examples = [replace(train_examples[r["i"]], text=r["text"]) for r in train_records]

    backbone = lmforge.api.load(model)
    tokenizer = backbone.tokenizer
    if tokenizer is None or not hasattr(backbone, "hidden_states"):
        raise UserError(f"{model}: expected a decoder with a tokenizer (a checkpoint or a model lmforge.load takes)")
    max_length = min(max_length, backbone.config.block_size)

    settings = {"lr": 5e-4 if method == "lora" else 5e-5, "min_lr": 0.0, "weight_decay": 0.0, "batch_size": 16,
                "eval_batches": 1, "log_interval": 10, "precision": "fp32"}
    settings.update({k.removeprefix("train."): v for k, v in (overrides or {}).items()})
    batch_size = settings["batch_size"]
    steps_per_epoch = fill_epoch_settings(settings, len(train_examples), epochs)
    settings.setdefault("max_steps", steps_per_epoch)
    settings.setdefault("warmup_steps", min(50, settings["max_steps"] // 10))
    if patience is not None:
        settings["patience"] = patience
    settings["keep_best"] = True
    train_config = from_dict(TrainConfig, settings, "train").validate()

    torch.manual_seed(train_config.seed)
    if method == "lora":
        backbone = apply_lora(backbone, lora_rank, lora_alpha, lora_dropout, lora_targets)
        if lora_layers is not None:
            freeze_lower_adapters(backbone, lora_layers)
    classifier = Classifier(backbone, labels, max_length)
    val_texts, val_targets = [e.text for e in val_examples], [index[e.label] for e in val_examples]

    def evaluate(m: nn.Module) -> dict[str, float]:
        return validation_scores(m, val_texts, val_targets, batch_size=2 * batch_size)

    batches = LabelledBatches([e.text for e in train_examples], [index[e.label] for e in train_examples], tokenizer,
                              batch_size, train_config.seed, max_length, augment, next(classifier.parameters()).device)
    if isinstance(data, (str, Path)):
        data_name = str(Path(data).resolve()) if Path(data).exists() else str(data)
    else:
        data_name = f"{len(train_examples)} records"
    trainer = Trainer(
        classifier, train_config, out, batches=batches, evaluate=evaluate, loss_fn=classification_loss,
        tokenizer=tokenizer,
        info={"task": "classify", "base": str(Path(model).resolve()) if Path(model).exists() else str(model),
              "method": method, "labels": labels, "data": data_name, "text_field": text_field,
              "label_field": label_field, "augment": augment is not None,
              "lora": {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout} if method == "lora" else None},
        tokens_per_row=sum(len(r) for r in encode_batch(tokenizer, batches.texts[:256], max_length))
        / min(256, len(batches.texts)),
        steps_per_epoch=steps_per_epoch,
    )
    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    total = sum(p.numel() for p in classifier.parameters())
    print(f"training a {len(labels)}-label classifier ({', '.join(labels)}) on {model} ({method}: {trainable:,} of "
          f"{total:,} parameters train), {len(train_examples)} examples, {len(val_examples)} held out; "
          f"{steps_per_epoch} steps per epoch", file=sys.stderr)
    before = evaluate(classifier)
    summary = trainer.fit()
    summary = {**summary, "val_accuracy_before": round(before["val_accuracy"], 6), "labels": labels,
               "method": method, "trainable_parameters": trainable, "out": str(out)}
    return trainer.finish(summary, title=f"{Path(str(model)).name} {method} classifier")


# ----------------------------------------------------------------------------------------------
# zero-shot: label words scored by a plain LM


def parse_label_words(spec: str | dict[str, str]) -> dict[str, str]:
    """`"fresh=positive,rotten=negative"` (or a dict) -> {label: word}; a bare `pos,neg` uses the labels themselves."""
    if isinstance(spec, dict):
        pairs = dict(spec)
    else:
        pairs = {}
        for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
            label, _, word = part.partition("=")
            pairs[label.strip()] = (word if word else label).strip()
    if len(pairs) < 2 or not all(pairs.values()) or not all(pairs):
        raise UserError(f"--labels {spec!r}: expected two or more LABEL=WORD pairs, "
                        f"e.g. fresh=positive,rotten=negative")
    return pairs


@torch.no_grad()
def label_word_scores(model: Any, texts: Sequence[str], label_words: dict[str, str],
                      template: str = DEFAULT_TEMPLATE, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Log-probability (N, n_labels) the LM gives each label's word (all its tokens) after the prompt.

    The prompt is `template` with `{text}` and optionally `{choices}` (the words, comma-separated); the
    word follows it after a space. Sequences shared by several labels (one-token words) are run once.
    """
    if "{text}" not in template:
        raise UserError(f"--template {template!r} has no {{text}} placeholder")
    tokenizer = model.tokenizer
    words = list(label_words.values())
    word_ids = [tokenizer.encode(" " + w) for w in words]
    prompts = tokenizer.encode_batch([template.replace("{choices}", ", ".join(words)).replace("{text}", t)
                                      for t in texts])
    context = model.config.block_size
    # each (text, label) needs the LM's predictions after prompt + word[:-1]; identical sequences run once
    sequences: dict[tuple[int, ...], int] = {}
    wanted = []  # (text, label, sequence, first position, word ids)
    for i, prompt in enumerate(prompts):
        longest = max(len(w) for w in word_ids)
        prompt = prompt[-(context - longest):]  # keep the end of the prompt, where the question is
        for j, word in enumerate(word_ids):
            sequence = tuple(prompt + word[:-1])
            wanted.append((i, j, sequences.setdefault(sequence, len(sequences)), len(prompt) - 1, word))
    unique = list(sequences)
    device = next(model.parameters()).device
    log_probs: list[torch.Tensor | None] = [None] * len(unique)  # (len, vocab) log-softmax for the word positions
    first = {}
    for _, _, s, position, _ in wanted:
        first[s] = min(first.get(s, position), position)
    order = sorted(range(len(unique)), key=lambda s: len(unique[s]))
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, unit="batch", desc="zero-shot"):
        picks = order[start:start + batch_size]
        ids, mask = pad_right([unique[s] for s in picks], tokenizer.eos_id, device)
        lengths = mask.sum(1)
        hidden = model.hidden_states(ids)  # (B, T, d)
        for row, s in enumerate(picks):
            h = hidden[row, first[s]:int(lengths[row])]  # the positions that predict word tokens
            log_probs[s] = (h @ model.head_weight.T).float().log_softmax(-1).cpu()
    scores = torch.zeros(len(texts), len(words))
    for i, j, s, position, word in wanted:
        rows = log_probs[s][position - first[s]:position - first[s] + len(word)]
        scores[i, j] = rows[torch.arange(len(word)), torch.tensor(word)].sum()
    return scores


def zero_shot(model: Any, texts: Sequence[str], label_words: str | dict[str, str],
              template: str = DEFAULT_TEMPLATE, batch_size: int = 16, progress: bool = False) -> list[dict[str, Any]]:
    """`{"label", "probabilities"}` for each text: the label whose word the LM prefers after the prompt."""
    import lmforge.api

    pairs = parse_label_words(label_words)
    if isinstance(model, (str, Path)):
        model = lmforge.api.load(model)
    empty = [i for i, t in enumerate(texts) if not str(t).strip()]
    if empty:
        raise UserError(f"text {empty[0] + 1} is empty; every text to classify needs some words")
    labels = list(pairs)
    probabilities = label_word_scores(model.eval(), texts, pairs, template, batch_size, progress).softmax(-1)
    return [{"label": labels[int(p.argmax())],
             "probabilities": {label: round(float(v), 6) for label, v in zip(labels, p)}} for p in probabilities]


# ----------------------------------------------------------------------------------------------
# the baseline and the evaluation report


def tfidf_baseline(train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str],
                   seed: int = 0) -> list[dict[str, Any]]:
    """TF-IDF (words and word pairs, sublinear tf) + logistic regression trained on the train texts;
    predictions for `texts` in the same shape as `predict`. Fixed settings, not tuned on any test data."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len(set(train_labels)) < 2:
        raise UserError("the baseline's training data has a single class; need at least 2")
    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                             LogisticRegression(C=4.0, max_iter=2000, random_state=seed))
    pipeline.fit(list(train_texts), list(train_labels))
    classes = [str(c) for c in pipeline.classes_]
    return [{"label": classes[int(p.argmax())], "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p)}}
            for p in pipeline.predict_proba(list(texts))]


def evaluate_classifier(
    classifier: str | Path | Classifier | None,
    data: str | Path | Records,
    out: str | Path,
    split: str = "test",
    train_data: str | Path | Records | None = None,
    text_field: str = "text",
    label_field: str = "label",
    zero_shot_model: str | Path | None = None,
    label_words: str | dict[str, str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    name: str = "classify",
) -> dict[str, Any]:
    """Score a classifier on `data` (a catalog dataset's `split`, a file, records) next to a TF-IDF + LR
    baseline trained on `train_data` (default: the catalog's train split, or the data the classifier
    was trained on), and, with `zero_shot_model` and `label_words`, zero-shot label words.

    Writes `OUT/NAME.json` and `OUT/NAME.md` (one row per system: accuracy, macro-F1, seconds) and a
    confusion-matrix PNG per system; returns the report.
    """
    from lmforge.eval.metrics import classification_scores
    from lmforge.eval.plots import plot_confusion
    from lmforge.eval.report import check_new_report, write_report
    from lmforge.train.checkpoint import read_info

    out = Path(out)
    check_new_report(out, name)
    examples = read_labelled(data, split, text_field, label_field)
    texts, gold = [e.text for e in examples], [e.label for e in examples]
    systems: dict[str, tuple[list[dict[str, Any]], float]] = {}
    train_fields = (text_field, label_field)
    labels: list[str] | None = None
    where = str(classifier) if isinstance(classifier, (str, Path)) else None
    if classifier is not None:
        if isinstance(classifier, (str, Path)):
            info = read_info(classifier)
            if train_data is None and isinstance(data, (str, Path)) and Path(data).exists():
                recorded = info.get("data")
                if recorded and Path(recorded).exists():  # the file the classifier was trained on, with its fields
                    train_data = recorded
                    train_fields = (info.get("text_field", "text"), info.get("label_field", "label"))
            classifier = load_classifier(classifier)
        labels = classifier.labels
        check_known_labels(examples, labels)
        start = time.perf_counter()
        systems[f"lmforge classifier ({where or 'in memory'})"] = (predict(classifier, texts, progress=True),
                                                                   time.perf_counter() - start)
    if train_data is None and isinstance(data, (str, Path)) and not Path(data).exists():
        train_data = data  # a catalog dataset: the baseline trains on its train split
    if train_data is not None:
        train = read_labelled(train_data, "train", *train_fields)
        labels = labels or label_names(train, str(train_data))
        start = time.perf_counter()
        systems["TF-IDF + logistic regression"] = (tfidf_baseline([e.text for e in train], [e.label for e in train],
                                                                  texts), time.perf_counter() - start)
    if zero_shot_model is not None:
        if label_words is None:
            raise UserError("zero-shot scoring needs --label-words LABEL=WORD,... as well as --zero-shot MODEL")
        words = parse_label_words(label_words)
        labels = labels or sorted(words)
        missing = sorted(set(labels) - set(words))
        if missing:
            raise UserError(f"--label-words gives no word for the label(s) {', '.join(missing)}")
        start = time.perf_counter()
        systems[f"zero-shot {Path(str(zero_shot_model)).name} ({', '.join(f'{k}={v}' for k, v in words.items())})"] = (
            zero_shot(zero_shot_model, texts, words, template, progress=True), time.perf_counter() - start)
    if not systems:
        raise UserError("nothing to evaluate: give a classifier, training data for the baseline, or a zero-shot model")
    labels = labels or sorted(set(gold))
    check_known_labels(examples, labels)
    report: dict[str, Any] = {"data": str(data) if isinstance(data, (str, Path)) else f"{len(examples)} records",
                              "split": split, "n": len(examples), "labels": labels, "systems": {}}
    rows = []
    for i, (system, (predictions, seconds)) in enumerate(systems.items()):
        scores = classification_scores([p["label"] for p in predictions], gold, labels)
        png = plot_confusion(scores["confusion"], labels, _mkdir(out) / f"confusion-{i}.png",
                             title=f"{system}\naccuracy {scores['accuracy']:.3f}")
        report["systems"][system] = {**scores, "seconds": round(seconds, 2), "confusion_png": str(png)}
        rows.append({"system": system, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                     **{f"f1 {label}": scores["per_class"][label]["f1"] for label in labels},
                     "seconds": round(seconds, 1)})
    report["paths"] = {k: str(v) for k, v in write_report(out, name, report, rows).items()}
    return report


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
