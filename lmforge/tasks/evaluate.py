"""`lmforge eval MODEL --task NAME`: one command that runs the right metric for a task.

    lmforge eval runs/rt --task classify --data rotten_tomatoes --out runs/rt-eval     # accuracy, F1, confusion
    lmforge eval runs/sum --task summarize --data xsum --out runs/sum-eval            # ROUGE vs lead-1
    lmforge eval runs/mt --task translate --data bible_en_ja --out runs/mt-eval       # BLEU, chrF
    lmforge eval smollm2-135m-instruct --task chat --data chatterbot                  # held-out chat loss
    lmforge eval runs/demo --task lm --data my.txt                                    # perplexity, bits/byte
    lmforge eval runs/chat --harness lmforge_boolq,lmforge_mmlu --limit 400 --out runs/chat-harness   # lm-eval

    report = evaluate("runs/sum", "summarize", data="xsum", out="runs/sum-eval")

Each task writes `OUT/TASK.json` (the numbers, the data, the model, the time) and `OUT/TASK.md`
(a table with the model next to its baseline), and returns the same numbers. Without `--data` a task
uses its catalog dataset (classify: rotten_tomatoes, summarize: xsum, translate: bible_en_ja,
label: rotten_tomatoes, chat: chatterbot, lm: shakespeare).
"""

from __future__ import annotations

import time
import typing
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import UserError

Task = Literal["classify", "summarize", "translate", "label", "chat", "lm"]
TASK_NAMES = typing.get_args(Task)
DEFAULT_DATA = {"classify": "rotten_tomatoes", "chat": "chatterbot", "lm": "shakespeare"}


def evaluate(
    model: str | Path,
    task: Task | None = None,
    data: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    direction: Literal["en-ja", "ja-en"] | None = None,
    max_length: int | None = None,
    device: str = "auto",
    harness: str | None = None,
    num_fewshot: int | None = None,
    include_path: list[str] | None = None,
) -> dict[str, Any]:
    """Measure a model on a task: the task's metric, a JSON report and a table.

    classify: accuracy, macro-F1 and a confusion matrix; summarize: ROUGE-1/2/L next to lead-1;
    translate: BLEU and chrF; label: accuracy of labels written as words; chat: the loss on held-out
    conversations; lm: perplexity and bits per byte on any text. Writes OUT/TASK.json and OUT/TASK.md;
    returns the report.

    Args:
        model: a checkpoint or run directory, or any model lmforge.load takes
        task: what to measure
        data: a catalog dataset or a local file or folder (default: the task's catalog dataset)
        split: the split of the data to score
        out: the directory to write the report into (JSON + table)
        limit: score only the first N examples
        batch_size: examples per forward pass
        direction: translate: the direction (default: what the model was trained on)
        max_length: text tasks: tokens of prompt + answer (default: as the model was trained)
        device: where the model runs: auto (a GPU where there is one), cpu, cuda, cuda:N or mps
        harness: instead of --task: lm-evaluation-harness tasks, comma-separated (lmforge's local ones:
            lmforge_boolq, lmforge_mmlu, lmforge_rotten_tomatoes, lmforge_kjv, lmforge_shakespeare; needs
            pip install 'lmforge[harness]'); writes OUT/harness.json, harness.md and each task's samples
        num_fewshot: --harness: examples shown before each question (default: each task's own)
        include_path: --harness: more folders of harness task YAML files (repeatable)
    """
    from lmforge.tasks import text2text

    if (task is None) == (harness is None):
        raise UserError("give either --task NAME (lmforge's metrics) or --harness TASKS (lm-evaluation-harness)")
    if harness is not None:
        from lmforge.devices import resolve_device
        from lmforge.eval.harness import evaluate_harness

        return evaluate_harness(model, [t.strip() for t in harness.split(",") if t.strip()], out, limit, num_fewshot,
                                batch_size, str(resolve_device(device)), include_path or [])
    if task not in TASK_NAMES:
        raise UserError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}")
    if task in text2text.TASKS:
        data = data or text2text.TASKS[task].default_data
        return text2text.evaluate_text_task(task, model, data, split, out, limit, batch_size, direction,
                                            max_length=max_length, device=device)
    data = data or DEFAULT_DATA[task]
    out = Path(out) if out is not None else None
    if task == "classify":
        from lmforge.tasks.classify import evaluate_classifier

        if out is None or limit is not None:
            raise UserError("--task classify scores the whole split and needs --out (the report has a confusion "
                            "matrix PNG); --limit is for the other tasks")
        return evaluate_classifier(model, data, out, split=split, device=device)
    if task == "chat":
        return evaluate_chat(model, data, "validation" if split == "test" else split, out, limit, batch_size, device)
    return evaluate_lm(model, data, split, out, limit, batch_size, device)


def evaluate_chat(model: str | Path, data: str | Path, split: str = "validation", out: str | Path | None = None,
                  limit: int | None = None, batch_size: int = 8, device: str = "auto") -> dict[str, Any]:
    """Loss (and perplexity) on the assistant turns of held-out conversations."""
    from lmforge.data import load
    from lmforge.data.sft import IGNORE, load_examples
    from lmforge.eval.metrics import perplexity
    from lmforge.eval.report import write_report
    from lmforge.train.objectives import evaluate_examples

    loaded = load_decoder(model, "chat", device)
    records = load(data, split)[:limit]
    start = time.perf_counter()
    examples = load_examples(records, loaded.tokenizer, loaded.config.block_size, "chat")
    loss = evaluate_examples(loaded, examples, batch_size, loaded.tokenizer.eos_id)
    tokens = sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)
    row = {"system": str(model), "loss": round(loss, 4), "perplexity": round(perplexity(loss), 3),
           "conversations": len(examples), "assistant_tokens": tokens}
    report = {"task": "chat", "data": str(data), "split": split, "model": str(model),
              "seconds": round(time.perf_counter() - start, 1), "scores": row}
    if out is not None:
        write_report(out, "chat", report, [row])
    return {**report, "rows": [row]}


def evaluate_lm(model: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
                limit: int | None = None, batch_size: int = 8, device: str = "auto") -> dict[str, Any]:
    """Perplexity and bits per byte of `model` on the texts of `data` (scored in windows of the model's context)."""
    import numpy as np

    from lmforge.data import load
    from lmforge.eval.metrics import perplexity
    from lmforge.eval.report import write_report
    from lmforge.train.objectives import bits_per_byte, evaluate_tokens

    loaded = load_decoder(model, "lm", device)
    texts = [str(r.get("text", "")) for r in load(data, split)[:limit]]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{data} ({split}) has no text to score (records need a 'text' field)")
    start = time.perf_counter()
    eos = loaded.tokenizer.eos_id
    tokens = np.array([t for text in texts for t in [eos, *loaded.tokenizer.encode(text)]], dtype=np.int64)
    result = evaluate_tokens(loaded, tokens, loaded.config.block_size, batch_size)
    utf8_bytes = sum(len(text.encode("utf-8")) for text in texts)
    row = {"system": str(model), "loss": round(result["loss"], 4), "perplexity": round(perplexity(result["loss"]), 3),
           "bits_per_byte": round(bits_per_byte(result["loss"], len(tokens) - 1, utf8_bytes), 4),
           "tokens": result["tokens"]}
    report = {"task": "lm", "data": str(data), "split": split, "model": str(model), "texts": len(texts),
              "seconds": round(time.perf_counter() - start, 1), "scores": row}
    if out is not None:
        write_report(out, "lm", report, [row])
    return {**report, "rows": [row]}


def load_decoder(model: str | Path, task: str, device: str = "auto"):
    """`lmforge.load(model, device)`, which must be a causal LM (the chat and lm tasks score next tokens)."""
    from lmforge.sources import load

    loaded = load(model, device)
    kind = getattr(loaded.config, "kind", "decoder")
    if kind != "decoder":
        raise UserError(f"{model} is a {kind} model; the {task} task scores a decoder (causal LM)")
    return loaded
