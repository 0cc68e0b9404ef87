"""Tests of lmforge.tokenizer: exact round trips, vocabulary size, special tokens, save/load, errors."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import UserError
from lmforge.tokenizer import Tokenizer, train_tokenizer

CORPUS = [
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n",
    "古池や蛙飛び込む水の音。吾輩は猫である。名前はまだ無い。\n",
    "Emoji: 🎉🚀👍🏽 and tabs\tand\r\nWindows lines   with   spaces.\n",
] * 20

ROUND_TRIP = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.",
    "中文文本，没有在训练数据里出现过的字：龘靐齉。",
    "日本語のテキスト、カタカナとひらがな。",
    "emoji 🎉🚀👨‍👩‍👧‍👦 🏳️‍🌈 and flags 🇯🇵",
    "tabs\tand\t\ttabs, CRLF\r\nlines\rCR alone\n\n\nblank lines",
    "   \t \n  \u00a0\u2028\u3000 unicode spaces",
    "a<|endoftext|>b: the separator inside text",
    "\x00\x01 control bytes \x7f",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400, show_progress=False)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_empty_string(tok: Tokenizer) -> None:
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]


def test_vocab_size_respected_and_merges_learned(tok: Tokenizer) -> None:
    assert 256 + 1 < tok.vocab_size <= 400
    # merges shorten common text well below one token per byte
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_eos_is_first_special_token(tok: Tokenizer) -> None:
    assert tok.special_tokens == ["<|endoftext|>"]
    assert tok.eos_id == tok.token_to_id("<|endoftext|>") == 0
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    assert tok.decode(tok.encode("a<|endoftext|>b"), skip_special_tokens=True) == "ab"
    assert tok.token_to_id("no such token") is None


def test_custom_special_tokens_survive_save_load(tmp_path) -> None:
    tok = train_tokenizer(CORPUS[:5], vocab_size=300, special_tokens=["</s>", "<pad>"], show_progress=False)
    assert tok.special_tokens == ["</s>", "<pad>"]
    assert tok.eos_id == tok.token_to_id("</s>")
    loaded = Tokenizer.load(tok.save(tmp_path / "t.json"))
    assert loaded.special_tokens == ["</s>", "<pad>"]
    assert loaded.eos_id == tok.eos_id
    assert not list(tmp_path.glob("*.tmp")) and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_save_load_directory_and_file(tok: Tokenizer, tmp_path) -> None:
    written = tok.save(tmp_path / "tok")
    assert written == tmp_path / "tok" / "tokenizer.json"
    for path in (tmp_path / "tok", written, str(written)):
        loaded = Tokenizer.load(path)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.eos_id == tok.eos_id
        assert loaded.to_json() == tok.to_json()
        for text in ROUND_TRIP:
            assert loaded.encode(text) == tok.encode(text)


def test_bad_vocab_size() -> None:
    for bad in (100, 256, 257, "512", 300.0):
        with pytest.raises(UserError, match="vocab_size"):
            train_tokenizer(CORPUS, vocab_size=bad, show_progress=False)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="at least 260"):
        train_tokenizer(CORPUS, vocab_size=259, special_tokens=["a", "b", "c"], show_progress=False)


def test_bad_training_input() -> None:
    with pytest.raises(UserError, match="special_tokens"):
        train_tokenizer(CORPUS, vocab_size=300, special_tokens=[], show_progress=False)
    with pytest.raises(UserError, match="duplicates"):
        train_tokenizer(CORPUS, vocab_size=300, special_tokens=["<e>", "<e>"], show_progress=False)
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(["", ""], vocab_size=300, show_progress=False)
    with pytest.raises(UserError, match="text #1"):
        train_tokenizer(["abc", None], vocab_size=300, show_progress=False)  # type: ignore[list-item]


def test_load_errors(tok: Tokenizer, tmp_path) -> None:
    with pytest.raises(UserError, match="no such tokenizer"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json in .*empty_dir"):
        Tokenizer.load(tmp_path / "empty_dir")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"version": "1.0",\n  oops}', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.json line 2: not valid JSON"):
        Tokenizer.load(bad_json)
    not_tok = tmp_path / "other.json"
    not_tok.write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(UserError, match="other.json is not a valid tokenizer.json"):
        Tokenizer.load(not_tok)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8"):
        Tokenizer.load(binary)
    # a tokenizer.json without any special token has no end-of-text token
    data = json.loads(tok.to_json())
    data["added_tokens"] = []
    no_special = tmp_path / "nospecial.json"
    no_special.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UserError, match="nospecial.json: tokenizer has no special tokens"):
        Tokenizer.load(no_special)


def test_long_texts_are_cut_without_changing_ids(tok: Tokenizer) -> None:
    from lmforge.tokenizer import _pieces

    lines = ["plain line", "  indented", "trailing spaces   ", "", "\t\ttabs", "中文行", "🎉 emoji", "x\r", "'s it"]
    text = "\n".join(lines[i % len(lines)] + f" {i}" * (i % 3) for i in range(3000)) + "\n\n  \n"
    pieces = _pieces(text, size=64)
    assert len(pieces) > 100 and "".join(pieces) == text
    whole = tok.encode(text)
    assert [i for p in pieces for i in tok.encode(p)] == whole
    assert tok.encode_batch([text, "short", text[:5000]]) == [whole, tok.encode("short"), tok.encode(text[:5000])]
