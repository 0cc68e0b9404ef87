"""Catalog chat datasets: chatterbot YAML becomes alternating user/assistant conversations, the
train/validation split is fixed and written once, and `finetune` takes a catalog name.

The real package is read only with LMFORGE_NETWORK_TESTS=1 (it is fetched from PyPI once).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmforge.data.catalog import COMPLETE_MARKER
from lmforge.data.datasets import DATASETS, chat_dataset, chat_dataset_file, is_validation
from lmforge.data.parsers import chatterbot_conversations
from lmforge.data.sft import DEFAULT_CHAT_TEMPLATE, load_examples
from lmforge.errors import UserError

YAML = """\
categories:
- test
conversations:
- - Hello
  - Hi there!
- - Is it raining?
  - 'yes'
  - Should I take an umbrella?
  - No
  - Why not?
- - How many legs has a spider?
  - 8
- - Tell me a story
  - |
    Once upon a time,
    there was a parser.
- - Only a question
- - ''
  - An answer to nothing
- A question and an answer run together into one string
"""


def test_chatterbot_yaml_becomes_alternating_turns():
    conversations = chatterbot_conversations(YAML, "test.yml")
    assert conversations == [
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}],
        # the last question has no answer: dropped; YAML's yes/no/8 stay the text they were
        [{"role": "user", "content": "Is it raining?"}, {"role": "assistant", "content": "yes"},
         {"role": "user", "content": "Should I take an umbrella?"}, {"role": "assistant", "content": "No"}],
        [{"role": "user", "content": "How many legs has a spider?"}, {"role": "assistant", "content": "8"}],
        [{"role": "user", "content": "Tell me a story"},
         {"role": "assistant", "content": "Once upon a time,\nthere was a parser."}],
        # a lone question, an empty turn and a malformed entry give nothing
    ]


@pytest.mark.parametrize("text", ["conversations: [[a, b]", "categories: [x]\n", "- just\n- a list\n"])
def test_bad_chatterbot_yaml_is_refused(text):
    with pytest.raises(UserError, match="bad.yml"):
        chatterbot_conversations(text, "bad.yml")


def test_the_split_goes_by_first_question():
    first = [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A field."}]
    again = [{"role": "user", "content": "  what IS   ai? "}, {"role": "assistant", "content": "Something else."}]
    assert is_validation(first) == is_validation(again)  # same question, same side, whatever the answer
    questions = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "a"}]
                 for i in range(2000)]
    held_out = sum(map(is_validation, questions))
    assert 150 < held_out < 250  # about one in ten


@pytest.fixture
def tiny_catalog(monkeypatch):
    """A catalog chat dataset `tinychat` of 60 conversations from YAML; counts how often it is built."""
    lines = ["conversations:"]
    for i in range(60):
        lines += [f"- - What is {i} plus {i}?", f"  - It is {2 * i}."]
    calls = []

    def tinychat(cache_dir=None):
        calls.append(cache_dir)
        chats = chatterbot_conversations("\n".join(lines) + "\n", "tiny.yml")
        return [(f"tiny.yml#{i}", m) for i, m in enumerate(chats, start=1)]

    monkeypatch.setitem(DATASETS, "tinychat", chat_dataset("tinychat", tinychat))
    return calls


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_chat_dataset_file_writes_a_fixed_split_once(tiny_catalog, tmp_path):
    train = chat_dataset_file("tinychat", cache_dir=tmp_path)
    val = chat_dataset_file("tinychat", "validation", cache_dir=tmp_path)
    assert train == tmp_path / "datasets" / "tinychat" / "train.jsonl"
    assert val.parent == train.parent and len(tiny_catalog) == 1  # built once, for both splits
    train_records, val_records = read_jsonl(train), read_jsonl(val)
    assert len(train_records) + len(val_records) == 60 and val_records
    assert all(is_validation(r["messages"]) for r in val_records)
    assert not any(is_validation(r["messages"]) for r in train_records)
    train_questions = {r["messages"][0]["content"] for r in train_records}
    assert not train_questions & {r["messages"][0]["content"] for r in val_records}
    assert not [p.name for p in train.parent.parent.iterdir() if p.name != "tinychat"]  # no temporary left

    # a cache made by other rules is made again; an intact one is not
    marker = train.parent / COMPLETE_MARKER
    marker.write_text("older rules\n")
    assert chat_dataset_file("tinychat", cache_dir=tmp_path) == train and len(tiny_catalog) == 2
    assert read_jsonl(train) == train_records
    chat_dataset_file("tinychat", "validation", cache_dir=tmp_path)
    assert len(tiny_catalog) == 2


def test_chat_dataset_file_refuses_unknown_names(tmp_path):
    with pytest.raises(UserError, match="unknown chat dataset"):
        chat_dataset_file("nope", cache_dir=tmp_path)
    with pytest.raises(UserError, match="unknown split"):
        chat_dataset_file("chatterbot", "test", cache_dir=tmp_path)


def test_finetune_takes_a_catalog_chat_dataset_and_its_validation_split(tiny_catalog, tmp_path, capsys):
    import lmforge
    from lmforge.recipes.finetune import finetune

    docs = " ".join(f"What is {i} plus {i}? It is {2 * i}." for i in range(60))
    (tmp_path / "text.txt").write_text(docs * 3)
    lmforge.prepare(tmp_path / "text.txt", tmp_path / "data", vocab_size=300, clean=False)  # repetitive on purpose
    lmforge.pretrain(tmp_path / "data", tmp_path / "run", preset="tiny",
                     overrides={"model.block_size": 64, "train.max_steps": 2, "train.eval_interval": 2,
                                "train.eval_batches": 1, "train.precision": "fp32"})
    capsys.readouterr()
    summary = finetune(tmp_path / "run", "tinychat", tmp_path / "ft", method="lora", epochs=1,
                       overrides={"train.batch_size": 4, "train.precision": "fp32"})
    n_val = len(read_jsonl(chat_dataset_file("tinychat", "validation")))
    assert f"on {60 - n_val} examples, {n_val} held out" in capsys.readouterr().err
    assert summary["val_loss_before"] > 0
    info = json.loads((tmp_path / "ft" / "best" / "lmforge.json").read_text())
    assert info["data"] == "tinychat"  # the run records the dataset as it was named (recipes.finetune.describe_source)


@pytest.mark.skipif(os.environ.get("LMFORGE_NETWORK_TESTS") != "1",
                    reason="reads chatterbot-corpus from PyPI; set LMFORGE_NETWORK_TESTS=1")
def test_the_real_chatterbot_corpus():
    from lmforge.tokenizer import train_tokenizer

    train, val = chat_dataset_file("chatterbot"), chat_dataset_file("chatterbot", "validation")
    train_records, val_records = read_jsonl(train), read_jsonl(val)
    assert (len(train_records), len(val_records)) == (811, 87)
    answers = sum(len(r["messages"]) // 2 for r in train_records + val_records)
    assert answers == 1017
    for record in train_records + val_records:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    assert {r["messages"][0]["content"] for r in train_records}.isdisjoint(
        r["messages"][0]["content"] for r in val_records)
    tokenizer = train_tokenizer(["What is AI? " * 50], vocab_size=300, show_progress=False)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    examples = load_examples(val, tokenizer, max_length=10_000)
    assert len(examples) == 87 and torch.tensor([len(e.ids) for e in examples]).min() > 5
