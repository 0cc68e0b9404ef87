"""Fine-tuning examples: the loss mask of chat and prompt/completion data, token by token, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.data.sft import DEFAULT_CHAT_TEMPLATE, IGNORE, chat_example, collate, example_batches, load_examples
from lmforge.errors import UserError
from lmforge.tokenizer import train_tokenizer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, and 绿色."},
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    text = "You are terse. Name a colour. Blue. Another one? Green, and red. " * 20
    tokenizer = train_tokenizer([text], vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                show_progress=False)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def labelled_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


def test_chat_labels_only_the_assistant_turns(chat_tokenizer):
    example = chat_example("x:1", {"messages": CHAT}, chat_tokenizer)
    assert chat_tokenizer.decode(example.ids) == chat_tokenizer.apply_chat_template(CHAT)
    # token by token: each label is either the token itself or ignored, and the learned tokens
    # spell exactly the assistant replies with their end-of-turn marks
    assert len(example.labels) == len(example.ids)
    assert all(label in (token, IGNORE) for token, label in zip(example.ids, example.labels))
    assert labelled_text(example, chat_tokenizer) == "Blue.<|im_end|>\nGreen, and 绿色.<|im_end|>\n"
    im_end = chat_tokenizer.token_to_id("<|im_end|>")
    learned_ends = [i for i, (t, lab) in enumerate(zip(example.ids, example.labels)) if t == im_end and lab != IGNORE]
    all_ends = [i for i, t in enumerate(example.ids) if t == im_end]
    assert len(all_ends) == 5 and len(learned_ends) == 2  # system and user turns are not learned


def test_prompt_completion_labels_the_completion_and_eos(chat_tokenizer, tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "Name a colour: ", "completion": "Blue."}) + "\n")
    [example] = load_examples(path, chat_tokenizer, max_length=64)
    assert labelled_text(example, chat_tokenizer) == "Blue.<|endoftext|>"
    assert chat_tokenizer.decode(example.ids) == "Name a colour: Blue.<|endoftext|>"


def test_plain_text_is_cut_into_windows(chat_tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Blue. Green. " * 40)
    examples = load_examples(path, chat_tokenizer, max_length=16)
    assert all(len(e.ids) <= 16 and e.ids == e.labels for e in examples)
    joined = [t for e in examples for t in e.ids]
    assert chat_tokenizer.decode(joined) == "Blue. Green. " * 40 + "<|endoftext|>"


def test_long_examples_are_cut_with_a_warning(chat_tokenizer, tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    full = chat_example("c", {"messages": CHAT}, chat_tokenizer)
    [example] = load_examples(path, chat_tokenizer, max_length=len(full.ids) - 3)
    assert example.ids == full.ids[:-3] and example.labels == full.labels[:-3]
    assert f"longer than {len(full.ids) - 3} tokens" in capsys.readouterr().err
    # cut before the first assistant turn, nothing is left to learn: a clear error
    with pytest.raises(UserError, match="no example has a token to learn"):
        load_examples(path, chat_tokenizer, max_length=8)


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "role 'robot'"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "content"),
    ("not a list", "messages"),
])
def test_bad_chat_records_name_the_line(chat_tokenizer, tmp_path, messages, fragment):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(UserError, match=fragment) as error:
        load_examples(path, chat_tokenizer, max_length=64)
    assert "c.jsonl:2" in str(error.value)


def test_batches_depend_only_on_the_step_and_cover_an_epoch(chat_tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(" ".join(str(i) for i in range(400)))  # every window differs
    examples = load_examples(path, chat_tokenizer, max_length=8)
    batches = example_batches(examples, batch_size=4, seed=3, pad_id=0)
    first = batches(0, 0, 4)
    assert torch.equal(first["ids"], example_batches(examples, 4, 3, 0)(0, 0, 4)["ids"])
    # two parts of 2 rows are the two halves of the batch of 4
    halves = [batches(0, part, 2)["ids"] for part in (0, 1)]
    assert torch.equal(torch.cat(halves), first["ids"])
    seen = torch.cat([batches(s, 0, 4)["ids"] for s in range(batches.steps_per_epoch)])
    assert len({tuple(r.tolist()) for r in seen}) >= len(examples) - 4


def test_collate_pads_with_ignored_targets():
    from lmforge.data.sft import Example

    batch = collate([Example("a", [1, 2, 3, 4], [IGNORE, 2, 3, 4]), Example("b", [5, 6], [5, 6])], pad_id=0)
    assert batch["ids"].tolist() == [[1, 2, 3], [5, 6, 0]]
    assert batch["targets"].tolist() == [[2, 3, 4], [6, IGNORE, IGNORE]]
