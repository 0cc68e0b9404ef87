"""Preference pairs where none exist, by self-play (SPIN, Chen et al. 2024): `lmforge dpo-pairs`.

    lmforge dpo-pairs smollm2-135m-instruct --data chatterbot --out runs/pairs
    lmforge dpo smollm2-135m-instruct --data runs/pairs --out runs/dpo     # reads train.jsonl, heldout.jsonl

Each conversation's last assistant turn is the chosen answer (a person wrote it); the model's own answer
to the same conversation so far is the rejected one. DPO on such pairs moves the model from its own
answers toward the human ones. The catalog's chatterbot gives its train split to train.jsonl and its
held-out split to heldout.jsonl; a chat JSONL file of your own has `--val-fraction` of its conversations
held out. Pairs whose generated answer is empty or equals the human one are left out (counted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.data.batches import hold_out
from lmforge.data.datasets import CHAT_DATASETS, chat_dataset_file
from lmforge.data.readers import read_jsonl_records
from lmforge.data.sft import check_messages, ensure_chat_template
from lmforge.errors import UserError
from lmforge.files import atomic_directory, check_new_directory
from lmforge.tasks.chat import turn_stops


def make_pairs(
    model: str | Path | Any,
    data: str | Path = "chatterbot",
    out: str | Path = "runs/pairs",
    max_new_tokens: int = 96,
    temperature: float = 0.7,
    seed: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    val_fraction: float = 0.1,
) -> dict[str, int]:
    """Make DPO pairs by self-play: the human answer is chosen, the model's own answer rejected.

    Writes OUT/train.jsonl and OUT/heldout.jsonl (conversational pairs: prompt messages, chosen and
    rejected assistant messages), the input of `lmforge dpo --data OUT`. Returns the counts.

    Args:
        model: the model whose answers are the rejected ones (usually the one DPO will tune)
        data: chat JSONL ({"messages": [...]}) or a catalog chat dataset (chatterbot)
        out: the folder to create
        max_new_tokens: the most tokens of a generated answer
        temperature: sampling temperature of the generated answers (0 = greedy)
        seed: the seed of the sampling
        batch_size: conversations answered at once
        limit: use at most this many conversations of each split (for a quick run)
        val_fraction: the share of a JSONL file's conversations held out (a catalog dataset has its own split)
    """
    from lmforge.sources import load

    out = Path(out)
    check_new_directory(out)
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: expected at least 1 conversation")
    if isinstance(data, (str, Path)) and str(data) in CHAT_DATASETS and not Path(data).exists():
        splits = {name: _conversations(chat_dataset_file(str(data), split))
                  for name, split in (("train", "train"), ("heldout", "validation"))}
    else:
        train, held = hold_out(_conversations(data), val_fraction, seed=0, what="conversation")
        splits = {"train": train, "heldout": held}
    model = load(model) if isinstance(model, (str, Path)) else model
    ensure_chat_template(model.tokenizer)
    counts: dict[str, int] = {}
    written = {}
    for split, conversations in splits.items():
        pairs, skipped = _self_play(model, conversations[:limit], max_new_tokens, temperature, seed, batch_size)
        written[split] = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        counts[split], counts[f"{split}_skipped"] = len(pairs), skipped
    if not counts["train"] or not counts["heldout"]:
        raise UserError(f"{data}: no pair could be made for {'train' if not counts['train'] else 'heldout'} "
                        f"(every generated answer was empty or equal to the human one)")
    with atomic_directory(out) as folder:  # both files or neither: a half-written folder is never left behind
        for split, text in written.items():
            (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
    return counts


def _conversations(source: str | Path) -> list[tuple[str, list[dict]]]:
    """(name, messages up to and including the last assistant turn) of each record of a chat JSONL."""
    out = []
    for name, record in read_jsonl_records(source):
        messages = check_messages(name, record.get("messages") if isinstance(record, dict) else None)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last == 0:
            raise UserError(f"{name}: the assistant speaks first; a pair needs a prompt before the answer")
        out.append((name, messages[:last + 1]))
    return out


def _self_play(model: Any, conversations: list[tuple[str, list[dict]]], max_new_tokens: int, temperature: float,
               seed: int, batch_size: int) -> tuple[list[dict], int]:
    """The pairs of `conversations` (the model answers each one's prompt) and how many were left out."""
    tokenizer = model.tokenizer
    prompts = [tokenizer.apply_chat_template(m[:-1], add_generation_prompt=True) for _, m in conversations]
    if not prompts:
        return [], 0
    from tqdm.auto import tqdm

    answers: list[str] = []
    with tqdm(total=len(prompts), desc="the model's own answers", unit="answer") as progress:
        for start in range(0, len(prompts), batch_size):  # a batch at a time: the bar moves, with an ETA
            answers += model.generate(prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                      temperature=temperature, seed=seed + start, batch_size=batch_size,
                                      stop=turn_stops(tokenizer, prompts[0]))
            progress.update(len(prompts[start:start + batch_size]))
    pairs, skipped = [], 0
    for (name, messages), answer in zip(conversations, answers):
        answer, human = answer.strip(), messages[-1]["content"]
        if not answer or answer == human.strip():
            skipped += 1
            continue
        pairs.append({"prompt": messages[:-1], "chosen": [messages[-1]],
                      "rejected": [{"role": "assistant", "content": answer}], "source": name})
    return pairs, skipped


def made_pairs(counts: dict[str, int], arguments: dict[str, Any]) -> str:
    """What `lmforge dpo-pairs` prints when it is done."""
    return (f"wrote {counts['train']} training pairs and {counts['heldout']} held-out pairs to {arguments['out']} "
            f"({counts['train_skipped'] + counts['heldout_skipped']} left out: the model's answer was empty or the "
            f"human one); next: lmforge dpo MODEL --data {arguments['out']} --out DIR")
