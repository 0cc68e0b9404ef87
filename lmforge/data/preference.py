"""Preference pairs for DPO: a prompt, the answer people chose and the one they rejected, as token ids.

One JSONL record per pair, in either of the shapes TRL's DPOTrainer reads:

    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}                               # plain text
    {"prompt": [{"role": "user", "content": "Hi"}],                                        # conversational
     "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go."}]}

Plain text: the answer is the text after the prompt, with end-of-text appended. Conversational: the
prompt is rendered by the chat template with the assistant's generation prompt, and the answer is what
rendering prompt + answer adds to it (the answer's text and its end-of-turn tokens), as TRL tokenizes
them, so the log-probabilities are those TRL computes. The loss counts the answer tokens only.

    pairs = load_pairs("pairs.jsonl", tokenizer, max_length=512)
    batch = collate_preferences(pairs[:8], pad_id=tokenizer.eos_id)   # 8 chosen rows, then 8 rejected
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lmforge.data.readers import read_jsonl_records
from lmforge.data.sft import IGNORE, Example, check_messages, collate, ensure_chat_template
from lmforge.errors import UserError

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One pair as token ids: the shared `prompt`, and the `chosen` and `rejected` answers that follow it.
    `reference` holds the reference model's (log p(chosen), log p(rejected)) once computed."""

    name: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    reference: tuple[float, float] | None = None


def load_pairs(source: str | Path | Sequence[dict], tokenizer, max_length: int) -> list[PreferencePair]:
    """The pairs of a JSONL file (or folder / glob of them, or records in memory), each cut to `max_length`
    tokens (the prompt loses its start first; a warning counts them). Bad records: a UserError naming the line."""
    in_memory = not isinstance(source, (str, Path))
    records = [(f"record {i + 1}", r) for i, r in enumerate(source)] if in_memory else read_jsonl_records(source)
    if not records:
        raise UserError(f"{source}: no preference pairs")
    pairs = [pair_from_record(name, record, tokenizer) for name, record in records]
    cut = [fit(pair, max_length) for pair in pairs]
    shortened = sum(a != b for a, b in zip(pairs, cut))
    if shortened:
        print(f"warning: {shortened} of {len(pairs)} pairs are longer than {max_length} tokens and were cut "
              f"(the prompt's start first)", file=sys.stderr)
    return cut


def pair_from_record(name: str, record: dict, tokenizer) -> PreferencePair:
    """One record as token ids (see the module docstring); empty or identical answers are refused."""
    if not isinstance(record, dict):
        raise UserError(f"{name}: expected an object with {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise UserError(f"{name}: missing field(s) {', '.join(missing)}; a pair has {', '.join(FIELDS)}")
    prompt, chosen, rejected = (record[f] for f in FIELDS)
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        for field, answer in (("chosen", chosen), ("rejected", rejected)):
            if not answer.strip():
                raise UserError(f"{name}: the {field} answer is empty")
        if chosen == rejected:
            raise UserError(f"{name}: chosen and rejected are the same answer; a pair needs two different ones")
        eos = tokenizer.eos_token
        return _split(name, tokenizer.encode(prompt), tokenizer.encode(prompt + _ending(chosen, eos)),
                      tokenizer.encode(prompt + _ending(rejected, eos)))
    if all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        ensure_chat_template(tokenizer)
        turns = [_answer(name, field, record[field]) for field in ("chosen", "rejected")]
        if turns[0] == turns[1]:
            raise UserError(f"{name}: chosen and rejected are the same answer; a pair needs two different ones")
        prompt = check_messages(name, prompt + turns[0])[:len(prompt)]
        render = tokenizer.apply_chat_template
        return _split(name, tokenizer.encode(render(prompt, add_generation_prompt=True)),
                      *(tokenizer.encode(render(prompt + turn)) for turn in turns))
    raise UserError(f"{name}: prompt, chosen and rejected must all be strings (text) or all be lists of messages "
                    f"(conversational)")


def _ending(answer: str, eos: str) -> str:
    return answer if answer.endswith(eos) else answer + eos


def _answer(name: str, field: str, messages: list) -> list[dict]:
    """The answer of a conversational pair: assistant messages with non-empty content."""
    if not messages or not all(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise UserError(f"{name}: {field} must be a non-empty list of assistant messages "
                        f'([{{"role": "assistant", "content": ...}}])')
    if not all(isinstance(m.get("content"), str) and m["content"].strip() for m in messages):
        raise UserError(f"{name}: the {field} answer is empty")
    return [{"role": "assistant", "content": m["content"]} for m in messages]


def _split(name: str, prompt: list[int], with_chosen: list[int], with_rejected: list[int]) -> PreferencePair:
    """The answers begin where prompt + answer stop agreeing with the prompt alone (a token that merges
    across the boundary belongs to the answer), as TRL splits them."""
    start = min(_common_prefix(prompt, with_chosen), _common_prefix(prompt, with_rejected))
    chosen, rejected = with_chosen[start:], with_rejected[start:]
    if start == 0:
        raise UserError(f"{name}: the prompt is empty; the first answer token needs a token before it")
    if not chosen or not rejected:
        raise UserError(f"{name}: an answer has no tokens after the prompt")
    return PreferencePair(name, prompt[:start], chosen, rejected)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def fit(pair: PreferencePair, max_length: int) -> PreferencePair:
    """`pair` with prompt + each answer within `max_length` tokens: the prompt keeps its end (at least one
    token), then an answer that still does not fit keeps its start."""
    longest = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longest <= max_length:
        return pair
    keep = max(1, max_length - longest)
    room = max_length - min(keep, len(pair.prompt))
    return replace(pair, prompt=pair.prompt[-keep:], chosen=pair.chosen[:room], rejected=pair.rejected[:room])


def collate_preferences(pairs: Sequence[PreferencePair], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """One batch of 2B rows (`lmforge.data.sft.collate`): the B prompt + chosen sequences, then the B prompt +
    rejected ones. `ids` (2B, T-1) and next-token `targets` (2B, T-1), -100 but on the answers' tokens; with
    the pairs' reference log-probabilities, `reference` (2B,) in the same order."""
    answers = [(p, p.chosen) for p in pairs] + [(p, p.rejected) for p in pairs]
    batch = collate([Example(p.name, p.prompt + answer, [IGNORE] * len(p.prompt) + answer) for p, answer in answers],
                    pad_id, device)  # fine-tuning's collate: right-padded, -100 where the loss does not count
    if all(p.reference is not None for p in pairs):
        reference = [p.reference[0] for p in pairs] + [p.reference[1] for p in pairs]  # type: ignore[index]
        batch["reference"] = torch.tensor(reference, dtype=torch.float32, device=device)
    return batch
