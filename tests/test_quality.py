"""Data quality: normalisation, control characters, filters, exact and near duplicates, the report,
train/validation leakage, and `prepare` writing quality.json (Python and CLI)."""

from __future__ import annotations

import json
import random

import pytest

import lmforge
from lmforge.cli import main
from lmforge.data import Document
from lmforge.data.quality import CleanConfig, clean, format_report, leakage, summary_line
from lmforge.errors import UserError

WORDS = ("river stone light winter garden market letter window silver morning village candle harbor forest "
         "mountain paper thunder meadow lantern bridge orchard valley shadow feather engine harvest island "
         "copper whisper journey velvet canyon").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def no_dedup(**overrides) -> CleanConfig:
    return CleanConfig(exact_dedup=False, near_dedup=False, **overrides)


def test_nfc_by_default_and_nfkc_on_request() -> None:
    records = ["cafe\u0301 au lait", "\ufb01ne \uff26\uff55\uff4c\uff4c width", "plain"]
    kept, report = clean(records, no_dedup())
    assert kept == ["caf\u00e9 au lait", "\ufb01ne \uff26\uff55\uff4c\uff4c width", "plain"]  # NFC keeps ligatures
    assert report["changed"]["normalized"] == 1
    kept, report = clean(records, no_dedup(normalize="NFKC"))
    assert kept == ["caf\u00e9 au lait", "fine Full width", "plain"]
    assert report["changed"]["normalized"] == 2
    kept, _ = clean(records, no_dedup(normalize=None))
    assert kept == records


def test_control_characters_removed_but_newline_and_tab_kept() -> None:
    kept, report = clean([{"text": "a\x00b\x07c\r\n\td\x1b[0m\x85e", "label": 1}], no_dedup())
    assert kept == [{"text": "abc\n\td[0me", "label": 1}]
    assert report["changed"]["control_characters"] == 1


def test_exact_duplicates_after_normalisation_keep_the_first_and_other_fields() -> None:
    records = [
        {"text": "A fine film.", "label": "fresh"},
        {"text": "Dull and long.", "label": "rotten"},
        {"text": "A  fine\nfilm.", "label": "rotten"},  # same text once whitespace is collapsed
        {"text": "A fine film\u0301.", "label": "fresh"},  # differs by a combining accent: kept
    ]
    kept, report = clean(records, CleanConfig(near_dedup=False))
    assert [r["label"] for r in kept] == ["fresh", "rotten", "fresh"]
    assert kept[0] == records[0]
    assert report["removed"]["exact_duplicate"] == 1
    assert report["examples"]["exact_duplicate"] == [
        {"record": "record 2", "duplicate_of": "record 0", "text": "A fine film."}
    ]
    assert (report["records_in"], report["records_out"]) == (4, 3)


def test_near_duplicate_pair_found_and_distinct_texts_kept() -> None:
    rng = random.Random(0)
    base = sentence(rng, 80)
    words = base.split()
    words[40] = "zebra"  # one word changed: Jaccard of word 5-grams = 71/81 = 0.88
    edited = " ".join(words)
    distinct = [sentence(rng, 80) for _ in range(20)]
    records = [base, *distinct[:10], edited, *distinct[10:]]
    kept, report = clean(records)
    assert edited not in kept and base in kept
    assert kept == [base, *distinct]
    assert report["removed"]["near_duplicate"] == 1
    example = report["examples"]["near_duplicate"][0]
    assert example["record"] == "record 11" and example["duplicate_of"] == "record 0"
    assert 0.85 < example["jaccard"] < 0.9
    # stricter than their similarity: both stay
    kept, report = clean(records, CleanConfig(near_threshold=0.95))
    assert edited in kept and report["removed"]["near_duplicate"] == 0


def test_near_duplicates_among_thousands_are_all_found_without_false_positives() -> None:
    """3,000 random 30-word texts plus 100 copies with one word at the end changed (Jaccard 25/27)."""
    rng = random.Random(1)
    originals = [sentence(rng, 30) for _ in range(3000)]
    copies = []
    for text in originals[:100]:
        words = text.split()
        words[-1] = "qq" + words[-1]
        copies.append(" ".join(words))
    kept, report = clean(originals + copies, CleanConfig(near_threshold=0.85))
    assert kept == originals
    assert report["removed"]["near_duplicate"] == 100
    # character shingles find them too
    kept, report = clean(originals + copies, CleanConfig(near_threshold=0.85, shingle="char", shingle_size=7))
    assert kept == originals


def test_minhash_of_sets_bigger_than_a_block() -> None:
    """MinHash(A u B) = min(MinHash(A), MinHash(B)), also for a set hashed in pieces, alone or among others."""
    import numpy as np

    from lmforge.data.quality import minhash_signatures

    rng = np.random.default_rng(0)
    big = np.unique(rng.integers(0, 2**32, size=400_000, dtype=np.uint64))
    small = np.array([1, 2, 3], dtype=np.uint64)
    halves = minhash_signatures([big[: len(big) // 2], big[len(big) // 2 :]])
    together = minhash_signatures([small, big, small])
    assert (together[1] == np.minimum(halves[0], halves[1])).all()
    assert (together[0] == together[2]).all() and (together[0] == minhash_signatures([small])[0]).all()


def test_length_and_repetition_filters() -> None:
    rng = random.Random(2)
    good = sentence(rng, 60)
    repeated_lines = "\n".join(["The same line again and again here."] * 8 + [sentence(rng, 10)])
    spam = " ".join(["buy now"] * 30)
    records = [good, "", "   \n", "tiny", sentence(rng, 500), repeated_lines, spam]
    kept, report = clean(records, CleanConfig(min_chars=10, max_words=200, repetition_min_words=20))
    assert kept == [good]
    assert report["removed"] == {"empty": 2, "too_short": 1, "too_long": 1, "repeated_lines": 1,
                                 "repeated_ngrams": 1, "exact_duplicate": 0, "near_duplicate": 0}
    # a repetitive text shorter than repetition_min_words is not judged by its shares
    kept, _ = clean(["buy now buy now buy now"], CleanConfig())
    assert kept == ["buy now buy now buy now"]
    kept, report = clean(["one two three", "one two three four five"], CleanConfig(min_words=4, max_chars=20))
    assert kept == [] and report["removed"]["too_short"] == 1 and report["removed"]["too_long"] == 1


def test_fields_of_summarization_records_and_documents() -> None:
    records = [{"document": "Rain fell all day.", "summary": "Rain."},
               {"document": "Rain fell all day.", "summary": "Wet day."}]
    kept, report = clean(records, fields=("document",))
    assert kept == records[:1] and report["fields"] == ["document"]
    kept, _ = clean(records, fields=("document", "summary"))
    assert kept == records
    docs = [Document("a.txt", "Hello\r\nworld\n"), Document("b.txt", "Hello\nworld\n")]
    kept, report = clean(docs)
    assert kept == [Document("a.txt", "Hello\nworld\n")]
    assert report["examples"]["exact_duplicate"][0]["record"] == "b.txt"
    with pytest.raises(UserError, match=r"record 1: no string field 'document' \(fields: text\)"):
        clean([{"document": "x"}, {"text": "y"}], fields=("document",))


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="clean.normalize = 'NFD'; expected NFC, NFKC or None"):
        clean(["x"], CleanConfig(normalize="NFD"))
    with pytest.raises(UserError, match="clean.near_threshold"):
        clean(["x"], CleanConfig(near_threshold=0))
    with pytest.raises(UserError, match="clean.num_perm = 110; expected a multiple of bands"):
        clean(["x"], CleanConfig(num_perm=110))


def test_report_table_and_summary_line() -> None:
    kept, report = clean(["same text", "same text", "other", ""])
    table = format_report(report)
    assert "exact_duplicate           1  record 1: same text" in table
    assert "kept                      2  of 4 records" in table
    report["leakage"] = leakage(["same text"], ["same text", "new"])
    assert summary_line(report) == ("cleaned 4 records -> 2 (removed: 1 empty, 1 exact duplicate); "
                                    "val leakage: 1 exact, 0 near of 2")
    json.dumps(report)  # JSON-ready


def test_leakage_counts_exact_and_near_copies() -> None:
    rng = random.Random(3)
    train = [sentence(rng, 40) for _ in range(50)]
    near = train[7].split()
    near[-1] = "different"  # one shingle of 36 differs: Jaccard 35/37
    val = [train[3].upper(), train[3], " ".join(near), sentence(rng, 40)]
    result = leakage(train, val)
    # upper-case is a different text exactly, but shingles are lower-cased: a near duplicate
    assert (result["val_records"], result["exact"], result["near"]) == (4, 1, 2)
    assert result["examples"]["exact"][0]["val"] == 1 and result["examples"]["exact"][0]["train"] == 3
    assert [(e["val"], e["train"]) for e in result["examples"]["near"]] == [(0, 3), (2, 7)]
    assert leakage(train, [sentence(rng, 40)])["near"] == 0


def test_prepare_cleans_and_writes_quality_json(tmp_path, tokenizer) -> None:
    rng = random.Random(4)
    texts = [sentence(rng, 200) + "\n" for _ in range(8)]
    docs = [Document(f"d{i}.txt", t) for i, t in enumerate(texts)]
    docs.append(Document("copy.txt", texts[2].replace(" ", "  ")))  # exact after whitespace
    docs.append(Document("nfd.txt", "cafe\u0301 " + sentence(rng, 100)))
    meta = lmforge.prepare(docs, tmp_path / "data", tokenizer=tokenizer, val_fraction=0.2)
    quality = json.loads((tmp_path / "data" / "quality.json").read_text())
    assert quality["records_in"] == 10 and quality["records_out"] == 9
    assert quality["removed"]["exact_duplicate"] == 1
    assert quality["examples"]["exact_duplicate"][0] == {"record": "copy.txt", "duplicate_of": "d2.txt",
                                                         "text": quality["examples"]["exact_duplicate"][0]["text"]}
    assert quality["changed"]["normalized"] == 1
    assert quality["leakage"]["val_records"] == len(meta["val_documents"])
    assert quality["leakage"]["exact"] == 0
    assert "copy.txt" not in meta["train_documents"] + meta["val_documents"]
    # without cleaning: every document, no quality.json, and the same meta as the low-level prepare
    plain = lmforge.prepare(docs, tmp_path / "plain", tokenizer=tokenizer, val_fraction=0.2, clean=False)
    assert len(plain["train_documents"] + plain["val_documents"]) == 10
    assert not (tmp_path / "plain" / "quality.json").exists()
    low = lmforge.data.prepare(docs, tokenizer, tmp_path / "low", val_fraction=0.2, show_progress=False)
    assert {k: v for k, v in low.items() if k != "source"} == {k: v for k, v in plain.items() if k != "source"}


def test_prepare_reports_leakage_it_cannot_remove(tmp_path, tokenizer) -> None:
    """With de-duplication off, a copy in both splits is reported as leakage."""
    rng = random.Random(5)
    docs = [Document(f"d{i}", sentence(rng, 100)) for i in range(10)]
    docs += [Document(f"copy{i}", d.text) for i, d in enumerate(docs)]
    lmforge.prepare(docs, tmp_path / "data", tokenizer=tokenizer, val_fraction=0.3,
                    clean=CleanConfig(exact_dedup=False, near_dedup=False))
    quality = json.loads((tmp_path / "data" / "quality.json").read_text())
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    text_of = {d.name: d.text for d in docs}
    train_texts = {text_of[name] for name in meta["train_documents"]}
    leaked = sum(text_of[name] in train_texts for name in meta["val_documents"])
    assert quality["leakage"]["exact"] == leaked > 0


def test_cli_prepare_prints_the_summary_and_takes_clean_flags(tmp_path, tokenizer, monkeypatch, capsys) -> None:
    """The CLI's `main` in this process (the subprocess path is tested in test_cli.py)."""
    monkeypatch.chdir(tmp_path)
    tokenizer.save(tmp_path / "tok")
    rng = random.Random(6)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [sentence(rng, 150) for _ in range(5)]
    for i, text in enumerate([*texts, texts[0]]):
        (corpus / f"{i}.txt").write_text(text + "\n")
    prepare = ["prepare", "--data", "corpus", "--tokenizer", "tok", "--out"]
    assert main([*prepare, "data"]) == 0
    out = capsys.readouterr().out
    assert "cleaned 6 records -> 5 (removed: 1 exact duplicate); val leakage: 0 exact, 0 near of" in out
    assert json.loads((tmp_path / "data" / "quality.json").read_text())["removed"]["exact_duplicate"] == 1
    assert main([*prepare, "plain", "--no-clean"]) == 0
    assert "cleaned" not in capsys.readouterr().out and not (tmp_path / "plain" / "quality.json").exists()
    assert main([*prepare, "nfkc", "--clean.normalize", "NFKC", "--clean.exact_dedup", "false"]) == 0
    quality = json.loads((tmp_path / "nfkc" / "quality.json").read_text())
    assert quality["config"]["normalize"] == "NFKC" and quality["records_out"] == 5  # the copy goes as near dup
    assert main([*prepare, "bad", "--clean.near_threshold", "2"]) == 2
    assert "clean.near_threshold = 2.0; expected a number in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*prepare, "all", "--clean.min_words", "1000"]) == 2
    assert "cleaning removed every document of corpus" in capsys.readouterr().err
