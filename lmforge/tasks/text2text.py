"""Tasks where a text goes in and a text comes out: summarization, translation, and labels as words.

    lmforge summarize train smollm2-135m-instruct xsum --out runs/sum --method lora --epochs 1
    lmforge summarize eval runs/sum xsum --out runs/sum-eval             # ROUGE, next to the lead-1 baseline
    lmforge translate train --preset gpt-micro bible_en_ja --out runs/mt --direction en-ja
    lmforge translate predict runs/mt --text "In the beginning God created the heavens and the earth."

    pairs = task_pairs(TASKS["summarize"], "xsum", "train")         # [{"source": ..., "target": ...}]
    summary = train_text_task("summarize", "smollm2-135m-instruct", "xsum", "runs/sum", method="lora")
    report = evaluate_text_task("summarize", "runs/sum", "xsum", out="runs/sum-eval")

A task names the fields of its records (`document` -> `summary`, `en` -> `ja`, `text` -> `label`),
a prompt template, the metric it is judged by and how many tokens an answer may take. A decoder
learns a task as prompt/completion pairs: the prompt is the template around the source, the
completion is the target, and the loss counts on the completion only (`lmforge.data.sft`); the
source is cut (in tokens) so that prompt and target always fit the model's context. A decoder is
either a pretrained model (fine-tuned fully or with LoRA, through `lmforge.recipes.finetune`) or a preset
trained from scratch here, with a tokenizer trained on the task's own training text. With
`model_kind="seq2seq"` the pairs train an encoder-decoder instead, and with `"cvae"` the conditional
VAE of the article (`lmforge.tasks.seq2seq`).
Predictions are greedy and stop at the end of the line.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from lmforge.config import FinetuneTrainConfig, ModelConfig, merge_settings, settings
from lmforge.errors import UserError

LANGUAGES = {"en": "English", "ja": "Japanese"}
MAX_VAL_PAIRS = 400  # validation loss on the first 400 pairs of the split: every epoch, so keep it quick


@dataclass(frozen=True)
class TextTask:
    """What a text-to-text task reads, how it asks, and how it is judged."""

    name: str
    source_field: str
    target_field: str
    template: str  # the prompt, around "{source}"
    metric: str  # rouge | translation | accuracy
    default_data: str
    max_new_tokens: int
    target_language: str = "en"
    context: int | None = None  # tokens of prompt + answer in training; predictions cut sources the same way


TASKS = {
    "summarize": TextTask("summarize", "document", "summary", "Article: {source}\nOne-sentence summary:",
                          "rouge", "xsum", 64),
    "translate": TextTask("translate", "en", "ja", "English: {source}\nJapanese:", "translation",
                          "bible_en_ja", 96, "ja"),
    "label": TextTask("label", "text", "label", "Text: {source}\nLabel:", "accuracy", "rotten_tomatoes", 8),
}


def get_task(name: str, direction: str | None = None) -> TextTask:
    """The task NAME; for translation, `direction` ("en-ja" or "ja-en") sets the fields and prompt."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known text tasks: {', '.join(TASKS)}")
    task = TASKS[name]
    if name == "translate" and direction:
        source, _, target = direction.partition("-")
        if source not in LANGUAGES or target not in LANGUAGES or source == target:
            raise UserError(f"--direction {direction!r}; expected en-ja or ja-en")
        task = replace(task, source_field=source, target_field=target, target_language=target,
                       template=f"{LANGUAGES[source]}: {{source}}\n{LANGUAGES[target]}:")
    return task


# ----------------------------------------------------------------------------------------------
# data


def task_pairs(task: TextTask, data: str | Path, split: str, limit: int | None = None) -> list[dict[str, str]]:
    """`{"source", "target"}` pairs from the task's fields of the records of `data`'s `split` (a catalog
    dataset, or a local file or folder: `lmforge.data.load`)."""
    from lmforge.data import load

    records = load(data, split)
    pairs = []
    for i, record in enumerate(records[:limit] if limit else records):
        for field in (task.source_field, task.target_field):
            if field not in record:
                raise UserError(f"{data} ({split}) record {i + 1} has no field {field!r}; the {task.name} task "
                                f"reads {task.source_field!r} -> {task.target_field!r}")
        source, target = str(record[task.source_field]).strip(), str(record[task.target_field]).strip()
        if source and target:
            pairs.append({"source": source, "target": target})
    if not pairs:
        raise UserError(f"{data} ({split}) has no record with both a {task.source_field!r} and a "
                        f"{task.target_field!r} text")
    return pairs


def prompt(task: TextTask, source: str, tokenizer, max_source_tokens: int) -> str:
    """The task's prompt around `source`, the source cut to at most `max_source_tokens` tokens."""
    ids = tokenizer.encode(source)
    if len(ids) > max_source_tokens:
        source = tokenizer.decode(ids[:max_source_tokens]).rstrip("\ufffd")
    return task.template.format(source=source)


def prompt_records(task: TextTask, pairs: list[dict[str, str]], tokenizer, max_length: int) -> list[dict[str, str]]:
    """Prompt/completion records whose prompt, completion and end-of-text fit in `max_length` tokens."""
    records = []
    template_tokens = len(tokenizer.encode(task.template.format(source="")))
    for pair in pairs:
        completion = " " + pair["target"]
        target_tokens = len(tokenizer.encode(completion)) + 1
        room = max_length - template_tokens - target_tokens
        if room < 8:  # a target that leaves (almost) no room for its source teaches nothing
            continue
        records.append({"prompt": prompt(task, pair["source"], tokenizer, room), "completion": completion})
    if not records:
        raise UserError(f"no {task.name} example fits in {max_length} tokens; raise --max-length")
    return records


# ----------------------------------------------------------------------------------------------
# training


@settings(model=ModelConfig, train=FinetuneTrainConfig)
def train_text_task(
    task: Literal["summarize", "translate", "label"] | TextTask,
    model: str | Path | None = None,
    data: str | Path | None = None,
    *,
    out: str | Path,
    method: Literal["full", "lora"] = "lora",
    epochs: float = 1,
    preset: str | None = None,
    model_kind: Literal["decoder", "seq2seq", "cvae"] = "decoder",
    direction: str | None = None,
    max_length: int = 512,
    limit: int | None = None,
    vocab_size: int = 8192,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a model for a text task: a pretrained one fine-tuned, or a preset from scratch.

    A decoder learns the task's prompt -> answer pairs (fine-tuned fully or with LoRA, or from scratch
    with --preset); --model-kind seq2seq or cvae trains an encoder-decoder (or the conditional VAE) from
    scratch instead. Training pairs are cleaned and checked for leakage into the validation split.
    `train --preset P DATA` reads its one positional argument as the data. The train.* defaults shown
    are fine-tuning's; from scratch they are TaskFromScratchTrainConfig's (lr 1e-3, batches of 16), and
    for seq2seq/cvae ScratchTrainConfig's (warmup a tenth of the run). Returns the summary.

    Args:
        task: the text task: summarize, translate or label
        model: the pretrained model to fine-tune (omit with --preset)
        data: a catalog dataset or a local folder (default: the task's catalog dataset)
        out: the run directory to create
        method: for a pretrained model: train all weights (full), or LoRA adapters
        epochs: passes over the training pairs (sets train.max_steps unless that is given)
        preset: train this model preset from scratch instead (see lmforge models)
        model_kind: decoder-only, encoder-decoder or conditional VAE (the last two from scratch, with --preset)
        direction: translation: en-ja or ja-en
        max_length: tokens per example; sources are cut to fit
        limit: use only the first N training pairs
        vocab_size: the size of the tokenizer trained when training from scratch
        overrides: model.FIELD and train.FIELD settings
        resume: continue the run in --out after a stop or a kill (the same command; train.* may change)
    """
    from lmforge.config import TaskFromScratchTrainConfig
    from lmforge.data.quality import clean_training_records
    from lmforge.recipes.finetune import finetune, load_trainable

    task = get_task(task, direction) if isinstance(task, str) else task
    if preset is not None and model is not None and data is None:
        model, data = None, model  # `train --preset P DATA`: the one positional argument is the data
    data = data if data is not None else task.default_data
    if (model is None) == (preset is None):
        raise UserError("give either a pretrained MODEL to fine-tune or --preset NAME to train from scratch")
    if model_kind not in ("decoder", "seq2seq", "cvae"):
        raise UserError(f"--model-kind {model_kind!r}; expected decoder, seq2seq or cvae")
    train_pairs = task_pairs(task, data, "train", limit)
    val_limit = MAX_VAL_PAIRS if limit is None else min(max(1, limit // 8), MAX_VAL_PAIRS)
    val_pairs = task_pairs(task, data, "validation", val_limit)
    train_pairs, quality = clean_training_records(train_pairs, val_pairs, ("source",))
    if model_kind != "decoder":
        if preset is None:
            raise UserError(f"--model-kind {model_kind} trains from scratch: give --preset, not a pretrained MODEL")
        from lmforge.config import ElboConfig
        from lmforge.recipes.seq2seq import train_seq2seq

        tokenizer = task_tokenizer(train_pairs, vocab_size)
        summary = train_seq2seq(train_pairs, val_pairs, tokenizer, preset, out, epochs=epochs, max_length=max_length,
                                overrides=overrides, info={"task": task.name, "data": str(data)},
                                elbo=ElboConfig() if model_kind == "cvae" else None, resume=resume)
        _write_task_file(out, task)
        return summary
    if preset is not None:
        base, method = None, "full"
        model_overrides = {k: v for k, v in (overrides or {}).items() if k.startswith("model.")}
        module = from_scratch(preset, task_tokenizer(train_pairs, vocab_size), max_length, model_overrides)
        overrides = {k: v for k, v in (overrides or {}).items() if k not in model_overrides}
        defaults = TaskFromScratchTrainConfig
    else:
        base, (module, _), defaults = str(model), load_trainable(model), FinetuneTrainConfig
    tokenizer, config = module.tokenizer, module.config
    context = min(max_length, getattr(config, "block_size", None) or config.max_position_embeddings)
    summary = finetune(module, prompt_records(task, train_pairs, tokenizer, context), out, method=method,
                       epochs=epochs, val_data=prompt_records(task, val_pairs, tokenizer, context),
                       data_format="prompt_completion", max_length=context, overrides=overrides, base=base,
                       resume=resume, defaults=defaults)
    _write_task_file(out, replace(task, context=context))
    return {**summary, "task": task.name, "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
            "quality": quality}


def task_tokenizer(pairs: list[dict[str, str]], vocab_size: int):
    """A byte-level BPE tokenizer trained on both sides of the training pairs."""
    from lmforge.tokenizer import train_tokenizer

    texts = [pair[side] for pair in pairs for side in ("source", "target")]
    return train_tokenizer(texts, vocab_size=vocab_size, show_progress=False)


def from_scratch(preset_name: str, tokenizer, max_length: int, overrides: dict[str, Any] | None = None):
    """A freshly initialised Decoder of `preset_name` (with `model.*` overrides), sized to the
    tokenizer and to `max_length`, with the tokenizer attached."""
    import torch

    from lmforge.config import ModelConfig, from_dict, preset, to_dict
    from lmforge.models.decoder import Decoder

    values = {**to_dict(preset(preset_name)), **{k.removeprefix("model."): v for k, v in (overrides or {}).items()}}
    values.update(vocab_size=tokenizer.vocab_size, block_size=max(values["block_size"], max_length))
    config = from_dict(ModelConfig, values, "model")
    torch.manual_seed(0)
    model = Decoder(config)
    model.tokenizer = tokenizer
    return model


def _write_task_file(out: str | Path, task: TextTask) -> None:
    """Record the task (fields, prompt) beside the checkpoints, so predict/eval ask the same way."""
    (Path(out) / "task.json").write_text(json.dumps(task.__dict__, indent=2) + "\n", encoding="utf-8")


def task_of(model_dir: str | Path, default: TextTask) -> TextTask:
    """The task a model was trained on (its run's `task.json`), else `default`."""
    for directory in (Path(model_dir), Path(model_dir).parent):
        file = directory / "task.json"
        if file.is_file():
            return TextTask(**json.loads(file.read_text(encoding="utf-8")))
    return default


# ----------------------------------------------------------------------------------------------
# prediction and evaluation


def predict_text_task(task: TextTask, model, sources: list[str], batch_size: int = 8,
                      max_new_tokens: int | None = None, beam_size: int = 1, context: int | None = None) -> list[str]:
    """Greedy answers of `model` to the task's prompts around `sources`, one line each; prompt and answer
    fit in `context` tokens (default: what the model was trained with on this task, else its context)."""
    from tqdm.auto import tqdm

    if getattr(model.config, "kind", "decoder") in ("seq2seq", "cvae"):
        from lmforge.tasks.seq2seq import predict

        return predict(model, sources, beam_size=beam_size, max_new_tokens=max_new_tokens or task.max_new_tokens,
                       batch_size=batch_size)
    if beam_size != 1:
        raise UserError("beam search is for encoder-decoder models; a decoder's answers are greedy (beam size 1)")
    new_tokens = max_new_tokens or task.max_new_tokens
    context = min(context or task.context or model.config.block_size, model.config.block_size)
    room = context - new_tokens - len(model.tokenizer.encode(task.template.format(source="")))
    if room < 8:
        raise UserError(f"a context of {context} tokens leaves no room for a source after {new_tokens} new tokens")
    prompts = [prompt(task, source, model.tokenizer, room) for source in sources]
    answers: list[str] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"{task.name}: predicting", unit="batch",
                  disable=len(prompts) <= batch_size):
        answers += model.generate(prompts[i:i + batch_size], max_new_tokens=new_tokens, temperature=0,
                                  stop=["\n"])
    return [answer.strip() for answer in answers]


def print_predictions(task: str, model: str | Path, text: list[str] | None = None, beam_size: int = 1,
                      direction: Literal["en-ja", "ja-en"] | None = None, device: str = "auto") -> None:
    """Answer texts with a model trained for the task (summaries, translations), one line each.

    The model answers with the prompt it was trained with (its run's task.json); greedy, or beam
    search for an encoder-decoder.

    Args:
        task: summarize or translate
        model: a model trained with `lmforge summarize train` / `lmforge translate train` (or any model)
        text: a text to answer (repeatable; default: each non-empty line of standard input)
        beam_size: beam search width (encoder-decoder models)
        direction: translate: en-ja or ja-en (default: what the model was trained on)
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
    """
    from lmforge.sources import load

    texts = text or [line for line in sys.stdin.read().splitlines() if line.strip()]
    trained = task_of(model, get_task(task, direction))
    for answer in predict_text_task(get_task(task, direction) if direction else trained, load(model, device), texts,
                                    beam_size=beam_size):
        print(answer)


def lead_sentence(document: str) -> str:
    """The first sentence of a document: the lead-1 baseline of news summarization."""
    first = re.split(r"(?<=[.!?])\s+", document.strip(), maxsplit=1)[0]
    return first.strip()


def score(task: TextTask, predictions: list[str], references: list[str]) -> dict[str, Any]:
    """The task's metric: ROUGE, BLEU + chrF, or accuracy (exact match after stripping)."""
    from lmforge.eval import metrics

    if task.metric == "rouge":
        return metrics.rouge(predictions, references)
    if task.metric == "translation":
        scores = metrics.translation_scores(predictions, references, task.target_language)
        return {"bleu": scores["bleu"], "chrf": scores["chrf"], "bleu_tokenize": scores["bleu_tokenize"]}
    return {k: v for k, v in metrics.classification_scores(predictions, references).items()
            if k in ("accuracy", "macro_f1")}


def evaluate_text_task(
    task: str | TextTask,
    model: Any,
    data: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    direction: Literal["en-ja", "ja-en"] | None = None,
    beam_size: int = 1,
    max_length: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Measure a model on a split: the task's metric next to its baselines.

    Summarize: ROUGE-1/2/L next to the lead-1 baseline; translate: BLEU and chrF. Writes
    OUT/TASK.json, OUT/TASK.md, the predictions and a length histogram when an output directory is
    given. Returns the report.

    Args:
        task: summarize, translate or label (or a TextTask)
        model: a model trained for the task (or any model lmforge.load takes; in Python also a loaded model)
        data: a catalog dataset or a local file or folder (default: the task's catalog dataset)
        split: the split to score
        out: the directory to write the report into (JSON + table)
        limit: score only the first N examples
        batch_size: sources per generation batch
        direction: translate: en-ja or ja-en (default: what the model was trained on)
        beam_size: beam search width (encoder-decoder models)
        max_length: tokens of prompt + answer (default: what the model was trained with)
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
    """
    from lmforge.eval.report import check_new_report, write_report
    from lmforge.sources import load

    task = get_task(task, direction) if isinstance(task, str) else task
    data = data or task.default_data
    model_name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        task = task_of(model, task)
        model = load(model, device)
    if out is not None:
        check_new_report(out, task.name)
    pairs = task_pairs(task, data, split, limit)
    sources, references = [p["source"] for p in pairs], [p["target"] for p in pairs]
    start = time.perf_counter()
    predictions = predict_text_task(task, model, sources, batch_size, beam_size=beam_size, context=max_length)
    seconds = time.perf_counter() - start
    rows = [{"system": model_name, **_numbers(score(task, predictions, references))}]
    if task.metric == "rouge":
        rows.append({"system": "lead-1 baseline", **_numbers(score(task, [lead_sentence(s) for s in sources],
                                                                    references))})
    report = {"task": task.name, "data": str(data), "split": split, "n": len(pairs), "model": model_name,
              "predict_seconds": round(seconds, 1), "scores": rows[0],
              "examples": [{"source": s[:300], "reference": r, "prediction": p}
                           for s, r, p in list(zip(sources, references, predictions))[:5]]}
    if out is not None:
        lines = [json.dumps({"prediction": p, "reference": r}, ensure_ascii=False) for p, r in zip(predictions,
                                                                                                 references)]
        write_report(out, task.name, report, rows, extra={f"{task.name}_predictions.jsonl": "\n".join(lines) + "\n"})
        from lmforge.plots import plot_lengths

        by_characters = task.target_language in ("ja", "zh")  # no spaces between words
        unit, size = ("characters", len) if by_characters else ("words", lambda t: len(t.split()))
        plot_lengths({"references": [size(r) for r in references], "predictions": [size(p) for p in predictions]},
                     Path(out) / f"{task.name}_lengths.png", f"{task.name} on {data} ({split})", unit)
    else:
        print(f"{task.name} on {data} ({split}, {len(pairs)}): {rows}", file=sys.stderr)
    return {**report, "rows": rows}


def _numbers(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}


# ----------------------------------------------------------------------------------------------
# several tasks in one run


def parse_mixture(specs: list[str]) -> list[tuple[TextTask, str, float]]:
    """`TASK:DATA[:WEIGHT]` specs (e.g. `summarize:xsum:2`, `label:rotten_tomatoes`) as (task, data, weight)."""
    mixture = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise UserError(f"--task {spec!r}; expected TASK:DATA or TASK:DATA:WEIGHT, e.g. summarize:xsum:2")
        weight = 1.0
        if len(parts) == 3:
            try:
                weight = float(parts[2])
            except ValueError:
                weight = -1.0
            if not weight > 0:
                raise UserError(f"--task {spec!r}: the weight must be a positive number")
        mixture.append((get_task(parts[0]), parts[1], weight))
    if not mixture:
        raise UserError("give at least one --task TASK:DATA[:WEIGHT]")
    return mixture


@settings(train=FinetuneTrainConfig)
def train_multitask(
    model: str | Path,
    mixture: list[str] | list[tuple[TextTask, str, float]],
    out: str | Path,
    method: Literal["full", "lora"] = "lora",
    epochs: float = 1,
    max_length: int = 512,
    limit: int | None = None,
    eval_limit: int | None = 50,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune one model on a weighted mixture of tasks, then score each.

    Every example carries its own task's prompt; each task's training pairs are cleaned and checked
    for leakage as in `train_text_task`. A task of weight w gets w / sum(weights) of the
    training examples of an epoch (the epoch has as many examples as all tasks together), drawn
    with a fixed seed, with repetition where a task has fewer; validation keeps every task's own
    validation examples. The report (OUT/multitask.json, .md) gives each task's score.

    Args:
        model: the pretrained model to fine-tune
        mixture: a task of the mixture as TASK:DATA[:WEIGHT], e.g. summarize:xsum:2 or label:rotten_tomatoes
            (--task, repeatable)
        out: the run directory to create
        method: train all weights (full), or LoRA adapters
        epochs: passes over the mixture
        max_length: tokens per example
        limit: use only the first N training pairs of each task
        eval_limit: test examples scored per task
        overrides: train.FIELD settings
        resume: continue the run in --out after a stop or a kill (the same command; train.* may change)
    """
    import numpy as np

    from lmforge.data.quality import clean_training_records
    from lmforge.eval.report import write_report
    from lmforge.recipes.finetune import finetune, load_trainable
    from lmforge.sources import load

    mixture = parse_mixture(mixture) if mixture and isinstance(mixture[0], str) else mixture
    module, _ = load_trainable(model)
    context = min(max_length, getattr(module.config, "block_size", None) or module.config.max_position_embeddings)
    per_task = []
    for task, data, weight in mixture:
        val_pairs = task_pairs(task, data, "validation", MAX_VAL_PAIRS // len(mixture))
        train_pairs, _ = clean_training_records(task_pairs(task, data, "train", limit), val_pairs, ("source",))
        train = prompt_records(task, train_pairs, module.tokenizer, context)
        val = prompt_records(task, val_pairs, module.tokenizer, context)
        per_task.append((task, data, weight, train, val))
    total = sum(len(train) for *_, train, _ in per_task)
    weights = sum(weight for _, _, weight, _, _ in per_task)
    rng = np.random.default_rng(0)
    train_records, val_records, shares = [], [], {}
    for task, data, weight, train, val in per_task:
        n = max(1, round(total * weight / weights))
        picks = rng.permutation(len(train))[:n] if n <= len(train) else rng.integers(0, len(train), n)
        train_records += [train[i] for i in picks]
        val_records += val
        shares[f"{task.name}:{data}"] = n
    order = rng.permutation(len(train_records))
    print(f"multi-task mixture (examples per epoch): {shares}", file=sys.stderr)
    summary = finetune(module, [train_records[i] for i in order], out, method=method, epochs=epochs,
                       val_data=val_records, data_format="prompt_completion", max_length=context,
                       overrides=overrides, base=str(model), resume=resume)
    trained = load(out, merge_settings(FinetuneTrainConfig, overrides).device)  # where it trained
    rows = []
    for task, data, _, _, _ in per_task:
        report = evaluate_text_task(task, trained, data, "test", limit=eval_limit)
        rows.append({"task": task.name, "data": data, "examples_per_epoch": shares[f"{task.name}:{data}"],
                     **{k: v for k, v in report["rows"][0].items() if k != "system"}})
    write_report(out, "multitask", {"model": str(model), "method": method, "mixture": shares, "train": summary}, rows)
    return {**summary, "tasks": rows}
