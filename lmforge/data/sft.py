"""Supervised fine-tuning examples: token ids, and labels that say where the loss counts.

Three shapes of data, detected from the first record (or forced with `data_format`):

- plain text (.txt/.md, or .jsonl/.csv/.parquet with a text field): causal LM on every token,
  cut into windows of the model's context;
- prompt / completion JSONL (`{"prompt": ..., "completion": ...}`): loss on the completion and
  the end-of-text token only;
- chat JSONL (`{"messages": [{"role": "user", "content": ...}, ...]}`): rendered with the
  tokenizer's chat template; loss on the assistant turns only (their text and end-of-turn token).

    examples = load_examples("chats.jsonl", tokenizer, max_length=512)
    batches = example_batches(examples, batch_size=8, seed=0, pad_id=tokenizer.eos_id)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data.batches import EpochBatches
from lmforge.data.readers import read_jsonl_records
from lmforge.data.sources import read_source
from lmforge.errors import UserError

IGNORE = -100
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One training sequence: `ids`, and `labels` equal to ids where the loss counts, else -100."""

    name: str
    ids: list[int]
    labels: list[int]


def detect_format(source: str | Path) -> str:
    """`chat`, `prompt_completion` or `text`, from the files' type and the first record's fields."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(path.glob("**/*")) if path.is_dir() else []
    if not any(f.suffix.lower() == ".jsonl" for f in files):
        return "text"
    return detect_record_format(read_jsonl_records(source)[0][1])


def detect_record_format(record: dict) -> str:
    """`chat` for a record with messages, `prompt_completion` for one with both, else `text`."""
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return "text"


def load_examples(source: str | Path | Sequence[dict], tokenizer, max_length: int, data_format: str = "auto",
                  text_field: str = "text") -> list[Example]:
    """Examples from `source` (files, or records already in memory), each at most `max_length` tokens
    (longer ones are cut, with a warning)."""
    in_memory = not isinstance(source, (str, Path))
    if data_format == "auto":
        data_format = detect_format(source) if not in_memory else detect_record_format(source[0] if source else {})
    if data_format == "text":
        return text_examples(source, tokenizer, max_length, text_field)
    records = [(f"record {i + 1}", r) for i, r in enumerate(source)] if in_memory else read_jsonl_records(source)
    if data_format == "chat":
        ensure_chat_template(tokenizer)
        examples = [chat_example(name, record, tokenizer) for name, record in records]
    elif data_format == "prompt_completion":
        examples = [prompt_completion_example(name, record, tokenizer) for name, record in records]
    else:
        raise UserError(f"unknown data format {data_format!r}; expected auto, text, prompt_completion or chat")
    too_long = sum(len(e.ids) > max_length for e in examples)
    if too_long:
        print(f"warning: {too_long} of {len(examples)} examples are longer than {max_length} tokens and were cut",
              file=sys.stderr)
    cut = [Example(e.name, e.ids[:max_length], e.labels[:max_length]) for e in examples]
    kept = [e for e in cut if any(label != IGNORE for label in e.labels[1:])]
    if not kept:
        raise UserError(f"{source}: no example has a token to learn within {max_length} tokens "
                        f"(the completions or assistant turns all lie beyond the cut)")
    if len(kept) < len(cut):
        print(f"warning: {len(cut) - len(kept)} examples have nothing to learn within {max_length} tokens "
              f"and were left out", file=sys.stderr)
    return kept


def text_examples(source: str | Path | Sequence[dict], tokenizer, max_length: int,
                  text_field: str = "text") -> list[Example]:
    """Plain text as causal LM windows of `max_length` tokens (documents joined by end-of-text)."""
    if isinstance(source, (str, Path)):
        name, texts = Path(source).name, [doc.text for doc in read_source(source, text_field)]
    else:
        name, texts = "records", [str(record.get(text_field, "")) for record in source]
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text) + [tokenizer.eos_id])
    windows = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    return [Example(f"{name}[{i}]", w, w) for i, w in enumerate(windows) if len(w) > 1]


def prompt_completion_example(name: str, record: dict, tokenizer) -> Example:
    for field in ("prompt", "completion"):
        if not isinstance(record.get(field), str):
            raise UserError(f"{name}: expected a string field {field!r}")
    prompt = tokenizer.encode(record["prompt"])
    completion = tokenizer.encode(record["completion"]) + [tokenizer.eos_id]
    return Example(name, prompt + completion, [IGNORE] * len(prompt) + completion)


def chat_example(name: str, record: dict, tokenizer) -> Example:
    """Render a conversation with the chat template; label the tokens of the assistant turns only."""
    messages = check_messages(name, record.get("messages"))
    text = tokenizer.apply_chat_template(messages)
    # the characters each assistant turn adds: render the conversation up to it (with the
    # generation prompt) and up to its end; what lies between is the assistant's to learn
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[:i + 1]))
            spans.append((start, end))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    labels = [
        token if any(a <= offset[0] < b for a, b in spans) else IGNORE
        for token, offset in zip(encoding.ids, encoding.offsets)
    ]
    return Example(name, list(encoding.ids), labels)


def check_messages(name: str, messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{name}: expected a non-empty list 'messages' of {{role, content}} objects")
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise UserError(f"{name}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{name}: message {i} has no string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{name}: the conversation has no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the ChatML one (saved with the fine-tuned model)."""
    if tokenizer.chat_template is None:
        print("note: the tokenizer has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)",
              file=sys.stderr)
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def example_batches(examples: Sequence[Example], batch_size: int, seed: int, pad_id: int) -> EpochBatches:
    """Shuffled epochs of padded examples (`collate`); the batch of a step depends only on (seed, step)."""
    return EpochBatches(examples, batch_size, seed, lambda items, step, part: collate(items, pad_id))


def collate(examples: Sequence[Example], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: `ids` (B, T-1) and next-token `targets` (B, T-1), -100 where padded."""
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long, device="cpu")  # filled on the CPU, moved once
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long, device="cpu")
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids, device="cpu")
        labels[row, :len(e.labels)] = torch.tensor(e.labels, device="cpu")
    return {"ids": ids[:, :-1].to(device), "targets": labels[:, 1:].to(device)}
