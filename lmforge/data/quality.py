"""Data quality: normalise, filter and de-duplicate text records, and report what was removed and why.

    from lmforge.data.quality import CleanConfig, clean, leakage, format_report
    kept, report = clean(records, CleanConfig(), fields=("text",))   # dicts, strings or Documents
    print(format_report(report))                                      # a short table: removed per reason
    report["leakage"] = leakage([r["text"] for r in train], [r["text"] for r in val])

What `clean` does to each record, in this order (each step can be turned off in `CleanConfig`):
1. Unicode normalisation of every named field (NFC by default, NFKC folds compatibility forms such as
   ligatures and full-width letters), and removal of control characters (category Cc) except
   newline and tab; a carriage return goes, so CRLF becomes LF. Such records are changed, not removed.
2. Length filters on the record's text (its named fields joined by a blank line): characters and
   words (whitespace-separated), e.g. `min_chars=1` drops records left empty.
3. Repetition filters (after Gopher, Rae et al. 2021, with its thresholds), on texts of at least
   `repetition_min_words` words only, since shares of a few words mean nothing:
   - duplicate-line share: characters in lines that repeat an earlier line, over all line characters
     (0.2; a play's repeated speaker names stay far below: 4-8% in Shakespeare);
   - top-bigram share: characters of the most frequent word bigram times its count, over all word
     characters (0.2).
4. Exact duplicates: the same text after normalisation with runs of whitespace collapsed; the first
   occurrence is kept.
5. Near duplicates: MinHash over shingles (word 5-grams by default, or character n-grams) with
   `num_perm=120` hash functions, split into `bands=20` bands of 6 rows for locality-sensitive
   hashing. Two texts with Jaccard similarity J share at least one band, and so are compared, with
   probability 1 - (1 - J^6)^20: 99.8% at J = 0.8, 92% at 0.7, 27% at 0.5. Candidates are checked
   by the exact Jaccard similarity of their shingle sets, and a record whose similarity to an earlier
   kept record is at least `near_threshold` (0.8) is removed. 31K Bible verses take about 4 s on 2 cores.

`leakage(train_texts, val_texts)` counts validation texts that also appear in training, exactly
(after the same normalisation) or as near duplicates, with examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmforge.config import param
from lmforge.data.readers import Document
from lmforge.errors import UserError

REASONS = ("empty", "too_short", "too_long", "repeated_lines", "repeated_ngrams", "exact_duplicate", "near_duplicate")
"""Why a record was removed, in the order the checks run."""

EXAMPLES_PER_REASON = 3
_EXAMPLE_CHARS = 120
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Cc except \t (0x09) and \n (0x0a)
_PRIME = np.uint64(4294967311)  # the smallest prime above 2**32: MinHash permutations are (a*x + b) mod it
_MIX = np.uint64(0x9E3779B97F4A7C15)
_BLOCK = 1 << 18  # MinHash values hashed per block


@dataclass
class CleanConfig:
    """How `clean` normalises, filters and de-duplicates records (the defaults suit most text)."""

    normalize: str | None = param("NFC", "Unicode normal form: NFC, NFKC (also folds ligatures, full-width "
                                         "letters), or None to leave text as it is")
    remove_control: bool = param(True, "remove control characters except newline and tab (CRLF becomes LF)")
    min_chars: int = param(1, "drop records with fewer characters (blank records always go)")
    max_chars: int | None = param(None, "drop records with more characters (None: no limit)")
    min_words: int = param(0, "drop records with fewer whitespace-separated words")
    max_words: int | None = param(None, "drop records with more words (None: no limit)")
    max_duplicate_line_share: float | None = param(0.2, "drop texts whose lines repeating an earlier line hold "
                                                        "more than this share of the characters (None: off)")
    max_top_bigram_share: float | None = param(0.2, "drop texts whose most frequent word bigram covers more than "
                                                    "this share of the word characters (None: off)")
    repetition_min_words: int = param(50, "apply the two repetition filters only to texts of at least this many "
                                          "words (50: Gopher's shortest document)")
    exact_dedup: bool = param(True, "remove exact duplicates (same text after normalisation and whitespace)")
    near_dedup: bool = param(True, "remove near duplicates (MinHash + LSH, then exact Jaccard)")
    near_threshold: float = param(0.8, "Jaccard similarity of shingle sets at or above which a text is a "
                                       "near duplicate")
    shingle: str = param("word", "shingles for near duplicates: word (word n-grams) or char (character n-grams)")
    shingle_size: int = param(5, "n of the shingle n-grams")
    num_perm: int = param(120, "MinHash hash functions")
    bands: int = param(20, "LSH bands (num_perm must be a multiple; rows per band = num_perm / bands)")
    seed: int = param(0, "seed of the MinHash hash functions")

    def validate(self) -> CleanConfig:
        """Return self, or raise a UserError naming the first bad field."""
        def bad(name: str, expected: str) -> UserError:
            return UserError(f"clean.{name} = {getattr(self, name)!r}; expected {expected}")

        if self.normalize is not None and self.normalize.upper() not in ("NFC", "NFKC"):
            raise bad("normalize", "NFC, NFKC or None")
        for name in ("min_chars", "min_words", "repetition_min_words"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        for name, low in (("max_chars", self.min_chars), ("max_words", self.min_words)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < max(low, 1)):
                raise bad(name, f"None or an integer >= {max(low, 1)}")
        for name in ("max_duplicate_line_share", "max_top_bigram_share"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise bad(name, "None or a number in [0, 1]")
        if not 0 < self.near_threshold <= 1:
            raise bad("near_threshold", "a number in (0, 1]")
        if self.shingle not in ("word", "char"):
            raise bad("shingle", "word or char")
        if not isinstance(self.shingle_size, int) or self.shingle_size < 1:
            raise bad("shingle_size", "an integer >= 1")
        if not isinstance(self.bands, int) or not isinstance(self.num_perm, int) or self.bands < 1 \
                or self.num_perm < self.bands or self.num_perm % self.bands:
            raise bad("num_perm", f"a multiple of bands ({self.bands})")
        return self


# ----------------------------------------------------------------------------------------------
# normalisation and filters of one text


def normalize_text(text: str, config: CleanConfig) -> str:
    """The text in the configured Unicode normal form, without control characters (but \\n and \\t)."""
    if config.normalize and not unicodedata.is_normalized(config.normalize.upper(), text):
        text = unicodedata.normalize(config.normalize.upper(), text)
    if config.remove_control:
        text = _CONTROL.sub("", text)
    return text


def duplicate_line_share(text: str) -> float:
    """Share of the characters of non-blank lines that are in lines repeating an earlier line."""
    seen: set[str] = set()
    total = repeated = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        total += len(line)
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total if total else 0.0


def top_bigram_share(words: Sequence[str]) -> float:
    """Characters of the most frequent word bigram times its count, over the characters of all words."""
    if len(words) < 2:
        return 0.0
    words = [w.lower() for w in words]
    (first, second), count = Counter(zip(words, words[1:])).most_common(1)[0]
    return count * (len(first) + len(second)) / sum(len(w) for w in words)


def _filter_reason(text: str, config: CleanConfig) -> str | None:
    """Why a normalised text fails the length or repetition filters, or None if it passes."""
    if not text.strip():
        return "empty"
    if len(text) < config.min_chars:
        return "too_short"
    if config.max_chars is not None and len(text) > config.max_chars:
        return "too_long"
    words = text.split()
    if len(words) < config.min_words:
        return "too_short"
    if config.max_words is not None and len(words) > config.max_words:
        return "too_long"
    if len(words) >= config.repetition_min_words:
        if config.max_duplicate_line_share is not None and duplicate_line_share(text) > config.max_duplicate_line_share:
            return "repeated_lines"
        if config.max_top_bigram_share is not None and top_bigram_share(words) > config.max_top_bigram_share:
            return "repeated_ngrams"
    return None


def _exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


# ----------------------------------------------------------------------------------------------
# MinHash and locality-sensitive hashing


def shingle_sets(texts: Sequence[str], kind: str = "word", size: int = 5) -> list[np.ndarray]:
    """Per text, the sorted unique 32-bit hashes (as uint64) of its lower-cased word or character n-grams.

    A text shorter than one n-gram is a single shingle of everything it has. All texts are hashed
    together with numpy: units (words or characters) are numbered, each n-gram gets a polynomial
    hash of its units' CRC-32s, and duplicates within a text are dropped.
    """
    if not texts:
        return []
    lowered = [t.lower() for t in texts]
    if kind == "word":
        vocab: dict[str, int] = {}
        per_text = [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in lowered]
        unit_hash = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in vocab), dtype=np.uint64, count=len(vocab))
        lengths = np.array([len(ids) for ids in per_text], dtype=np.int64)
        units = unit_hash[np.fromiter((i for ids in per_text for i in ids), dtype=np.int64, count=int(lengths.sum()))]
    else:
        lengths = np.array([len(t) for t in lowered], dtype=np.int64)
        units = np.frombuffer("".join(lowered).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    ends = np.cumsum(lengths)
    text_of = np.repeat(np.arange(len(texts)), lengths)  # the text each unit belongs to
    remaining = ends[text_of] - np.arange(units.size)  # units left in its text from each position
    h = np.zeros(units.size, dtype=np.uint64)
    for j in range(size):  # polynomial hash of the window starting at each position, wrapping at 2**64
        inside = remaining > j
        h[inside] = h[inside] * _MIX + units[np.flatnonzero(inside) + j] + np.uint64(1)
    h ^= h >> np.uint64(31)  # mix the high bits down, then keep 32 bits
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h >>= np.uint64(32)
    starts = ends - lengths
    whole = np.zeros(units.size, dtype=bool)  # full windows, or the start of a text shorter than one
    whole[remaining >= size] = True
    whole[starts[(lengths > 0) & (lengths < size)]] = True
    combined = np.unique((text_of[whole].astype(np.uint64) << np.uint64(32)) | h[whole])
    owner = (combined >> np.uint64(32)).astype(np.int64)
    cuts = np.searchsorted(owner, np.arange(len(texts) + 1))
    hashes = combined & np.uint64(0xFFFFFFFF)
    empty = np.zeros(1, dtype=np.uint64)  # an empty text: one shingle, the same for every empty text
    return [hashes[cuts[i] : cuts[i + 1]] if cuts[i + 1] > cuts[i] else empty for i in range(len(texts))]


def minhash_signatures(sets: Sequence[np.ndarray], num_perm: int = 120, seed: int = 0) -> np.ndarray:
    """(len(sets), num_perm) MinHash signatures: per hash function, the minimum over each (non-empty) set.

    The hash functions are multiply-shift ones, ((a * x + b) mod 2**64) >> 32 with odd 64-bit `a`,
    drawn from `seed`. Values go through in blocks of about 2**18 (a bigger set in pieces, whose
    minima are combined), 32 hash functions at a time, so memory stays under ~70 MB.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64)
    pieces, first_piece = [], []
    for values in sets:
        first_piece.append(len(pieces))
        pieces.extend(values[lo : lo + _BLOCK] for lo in range(0, len(values), _BLOCK))
    signatures = np.empty((len(pieces), num_perm), dtype=np.uint64)
    start = 0
    while start < len(pieces):
        stop, total = start, 0
        while stop < len(pieces) and (stop == start or total + len(pieces[stop]) <= _BLOCK):
            total += len(pieces[stop])
            stop += 1
        block = np.concatenate(pieces[start:stop])
        offsets = np.cumsum([0] + [len(piece) for piece in pieces[start : stop - 1]])
        for p in range(0, num_perm, 32):  # (32, block) hash values, computed in place
            values = np.multiply(a[p : p + 32], block[None, :])
            values += b[p : p + 32]
            values >>= np.uint64(32)
            signatures[start:stop, p : p + 32] = np.minimum.reduceat(values, offsets, axis=1).T
        start = stop
    if len(pieces) == len(sets):
        return signatures
    return np.minimum.reduceat(signatures, np.array(first_piece), axis=0)


def band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """(texts, bands) hashes, one per LSH band of each signature: texts sharing one are candidates."""
    n, num_perm = signatures.shape
    grouped = signatures.reshape(n, bands, num_perm // bands)
    keys = np.zeros((n, bands), dtype=np.uint64)
    for r in range(grouped.shape[2]):
        keys = keys * _MIX + grouped[:, :, r]
    return keys


def sharing_a_band(keys: np.ndarray) -> np.ndarray:
    """Boolean mask of the texts that share at least one band key with another text.

    Only these can be near duplicates of anything, so only they go through the (Python) index.
    """
    shared = np.zeros(len(keys), dtype=bool)
    for band in keys.T:
        _, inverse, counts = np.unique(band, return_inverse=True, return_counts=True)
        shared |= counts[inverse] > 1
    return shared


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


class NearDuplicateIndex:
    """Texts added by `add`; `most_similar` finds the added text most similar to a new one, via LSH."""

    def __init__(self, bands: int) -> None:
        self.buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
        self.sets: dict[int, np.ndarray] = {}

    def add(self, item: int, shingles: np.ndarray, keys: Sequence[int]) -> None:
        self.sets[item] = shingles
        for bucket, key in zip(self.buckets, keys, strict=True):
            bucket.setdefault(key, []).append(item)

    def most_similar(self, shingles: np.ndarray, keys: Sequence[int]) -> tuple[int | None, float]:
        """(the added item with the highest Jaccard similarity among LSH candidates, that similarity)."""
        candidates = {item for bucket, key in zip(self.buckets, keys, strict=True) for item in bucket.get(key, ())}
        best, best_j = None, 0.0
        for item in sorted(candidates):
            j = jaccard(shingles, self.sets[item])
            if j > best_j:
                best, best_j = item, j
        return best, best_j


def _shingles_and_keys(texts: Sequence[str], config: CleanConfig) -> tuple[list[np.ndarray], np.ndarray]:
    """Shingle sets and LSH band keys of texts, in batches of about 2**23 characters (bounded memory)."""
    sets: list[np.ndarray] = []
    keys = []
    start = 0
    while start < len(texts):
        stop, chars = start, 0
        while stop < len(texts) and (stop == start or chars + len(texts[stop]) <= 1 << 23):
            chars += len(texts[stop])
            stop += 1
        batch = shingle_sets(texts[start:stop], config.shingle, config.shingle_size)
        sets += batch
        keys.append(band_keys(minhash_signatures(batch, config.num_perm, config.seed), config.bands))
        start = stop
    return sets, np.concatenate(keys) if keys else np.zeros((0, config.bands), dtype=np.uint64)


# ----------------------------------------------------------------------------------------------
# records


def _record_text(record: Any, fields: Sequence[str], where: str) -> str:
    """The text a record is judged by: its named fields joined by a blank line."""
    if isinstance(record, str):
        return record
    if isinstance(record, Document):
        return record.text
    if isinstance(record, dict):
        for f in fields:
            if not isinstance(record.get(f), str):
                raise UserError(f"{where}: no string field {f!r} (fields: {', '.join(map(str, record)) or 'none'})")
        return "\n\n".join(record[f] for f in fields)
    raise UserError(f"{where}: expected a dict, a string or a Document, got {type(record).__name__}")


def _normalized_record(record: Any, fields: Sequence[str], config: CleanConfig) -> Any:
    if isinstance(record, str):
        return normalize_text(record, config)
    if isinstance(record, Document):
        return dataclasses.replace(record, text=normalize_text(record.text, config))
    return {**record, **{f: normalize_text(record[f], config) for f in fields}}


def _record_name(record: Any, index: int) -> str:
    return record.name if isinstance(record, Document) else f"record {index}"


def _example(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 3] + "..."


def clean(
    records: Iterable[Any],
    config: CleanConfig | None = None,
    fields: Sequence[str] = ("text",),
) -> tuple[list[Any], dict[str, Any]]:
    """(the records that pass, a report of what was changed and removed and why).

    `records` are dicts (the `fields` named are checked, e.g. ("text",) for classification or
    ("document",) for summarization; other fields such as "label" are kept as they are), plain
    strings, or `Document`s. Kept records come back in their order with their named fields
    normalised. The report (JSON-ready) holds the counts in and out, `removed` per reason,
    `changed` (normalised, control characters), up to 3 `examples` per reason, the config and the time.
    """
    config = (config or CleanConfig()).validate()
    if isinstance(fields, str):
        fields = (fields,)
    started = time.perf_counter()
    records = list(records)
    removed = dict.fromkeys(REASONS, 0)
    examples: dict[str, list[dict[str, Any]]] = {reason: [] for reason in REASONS}
    changed = {"normalized": 0, "control_characters": 0}

    def drop(reason: str, index: int, text: str, **extra: Any) -> None:
        removed[reason] += 1
        if len(examples[reason]) < EXAMPLES_PER_REASON:
            examples[reason].append({"record": _record_name(records[index], index), **extra, "text": _example(text)})

    survivors: list[tuple[int, Any, str]] = []  # (index in records, normalised record, its text)
    for i, record in enumerate(records):
        raw = _record_text(record, fields, _record_name(record, i))
        if config.normalize and not unicodedata.is_normalized(config.normalize.upper(), raw):
            changed["normalized"] += 1
        if config.remove_control and _CONTROL.search(raw):
            changed["control_characters"] += 1
        record = _normalized_record(record, fields, config)
        text = _record_text(record, fields, _record_name(record, i))
        reason = _filter_reason(text, config)
        if reason:
            drop(reason, i, text)
        else:
            survivors.append((i, record, text))

    if config.exact_dedup:
        first_of: dict[bytes, int] = {}
        unique = []
        for i, record, text in survivors:
            key = _exact_key(text)
            if key in first_of:
                drop("exact_duplicate", i, text, duplicate_of=_record_name(records[first_of[key]], first_of[key]))
            else:
                first_of[key] = i
                unique.append((i, record, text))
        survivors = unique

    if config.near_dedup and survivors:
        sets, keys = _shingles_and_keys([text for _, _, text in survivors], config)
        shared = sharing_a_band(keys)
        index = NearDuplicateIndex(config.bands)
        unique = []
        for k, (i, record, text) in enumerate(survivors):
            if not shared[k]:  # no band in common with any other text: no near duplicate either way
                unique.append((i, record, text))
                continue
            match, similarity = index.most_similar(sets[k], keys[k].tolist())
            if match is not None and similarity >= config.near_threshold:
                j = survivors[match][0]
                drop("near_duplicate", i, text, duplicate_of=_record_name(records[j], j), jaccard=round(similarity, 3))
            else:
                index.add(k, sets[k], keys[k].tolist())
                unique.append((i, record, text))
        survivors = unique

    kept = [record for _, record, _ in survivors]
    report = {
        "records_in": len(records),
        "records_out": len(kept),
        "removed": removed,
        "changed": changed,
        "examples": {reason: found for reason, found in examples.items() if found},
        "fields": list(fields),
        "config": dataclasses.asdict(config),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return kept, report


def leakage(train_texts: Sequence[str], val_texts: Sequence[str], config: CleanConfig | None = None) -> dict[str, Any]:
    """How many validation texts also appear in training: exactly (after normalisation), or as near duplicates.

    `near` counts validation texts that are not exact copies but whose shingle-set Jaccard
    similarity to some training text is at least `config.near_threshold`. Examples name the
    validation and training positions.
    """
    config = (config or CleanConfig()).validate()
    train_texts = [normalize_text(t, config) for t in train_texts]
    val_texts = [normalize_text(t, config) for t in val_texts]
    train_keys = {}
    for j, text in enumerate(train_texts):
        train_keys.setdefault(_exact_key(text), j)
    exact: list[dict[str, Any]] = []
    rest = []
    for i, text in enumerate(val_texts):
        j = train_keys.get(_exact_key(text))
        if j is None:
            rest.append(i)
        else:
            exact.append({"val": i, "train": j, "text": _example(text)})
    near: list[dict[str, Any]] = []
    if rest and train_texts:
        sets, keys = _shingles_and_keys(train_texts + [val_texts[i] for i in rest], config)
        shared = sharing_a_band(keys)
        index = NearDuplicateIndex(config.bands)
        for j in np.flatnonzero(shared[: len(train_texts)]).tolist():
            index.add(j, sets[j], keys[j].tolist())
        for k, i in enumerate(rest, start=len(train_texts)):
            if not shared[k]:
                continue
            j, similarity = index.most_similar(sets[k], keys[k].tolist())
            if j is not None and similarity >= config.near_threshold:
                near.append({"val": i, "train": j, "jaccard": round(similarity, 3), "text": _example(val_texts[i])})
    return {
        "val_records": len(val_texts),
        "exact": len(exact),
        "near": len(near),
        "examples": {"exact": exact[:EXAMPLES_PER_REASON], "near": near[:EXAMPLES_PER_REASON]},
    }


def clean_training_records(train: Sequence[Any], held_out: Sequence[Any], fields: Sequence[str] = ("text",),
                           config: CleanConfig | None = None) -> tuple[list[Any], dict[str, Any]]:
    """What the task loaders do: clean a task's training records (as `clean`), check its held-out
    records for copies in what is kept (as `leakage`), print the one-line summary; return both."""
    kept, report = clean(train, config, fields)
    report["leakage"] = leakage([_record_text(r, fields, "training record") for r in kept],
                                [_record_text(r, fields, "held-out record") for r in held_out], config)
    print(summary_line(report), file=sys.stderr)
    return kept, report


def summary_line(report: dict[str, Any]) -> str:
    """One line: records in and out, removed per reason (only those that removed any), leakage if checked."""
    removed = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in report["removed"].items() if n)
    line = f"cleaned {report['records_in']:,} records -> {report['records_out']:,} (removed: {removed or 'none'})"
    if "leakage" in report:
        leak = report["leakage"]
        line += f"; val leakage: {leak['exact']} exact, {leak['near']} near of {leak['val_records']:,}"
    return line


def format_report(report: dict[str, Any]) -> str:
    """A short table: removed per reason with an example each, then changes and leakage."""
    rows = [f"{'reason':<18}{'removed':>9}  example", "-" * 60]
    for reason, n in report["removed"].items():
        shown = report["examples"].get(reason, [{}])[0]
        example = f"{shown.get('record', '')}: {shown.get('text', '')[:60]}" if n else ""
        rows.append(f"{reason:<18}{n:>9,}  {example}")
    rows.append(f"{'kept':<18}{report['records_out']:>9,}  of {report['records_in']:,} records")
    rows.append(f"changed: {report['changed']['normalized']:,} normalised, "
                f"{report['changed']['control_characters']:,} with control characters removed")
    if "leakage" in report:
        leak = report["leakage"]
        rows.append(f"validation leakage: {leak['exact']:,} exact and {leak['near']:,} near duplicates of training "
                    f"among {leak['val_records']:,} validation records")
    return "\n".join(rows)
