"""Token shards: documents tokenized once into flat, memory-mapped token files for pretraining.

    meta = prepare("corpus/", tokenizer, "runs/data")   # writes train.bin, val.bin, meta.json, tokenizer.json
    shards = TokenShards("runs/data")
    train = shards.split("train")                       # read-only np.memmap of token ids

Each document's tokens are followed by the end-of-text id, so documents never run into each other
without a separator. Validation holds out whole documents (never half a play in each split), chosen
by a hash of their names so the choice is stable. The output directory is written atomically: it
holds either the old data or the complete new data, never a mix. Given the report of
`lmforge.data.quality.clean` on the documents, `prepare` adds the train/validation leakage check of
its split to it and writes it as `quality.json` beside `meta.json`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lmforge import crypto
from lmforge.data.quality import CleanConfig, leakage
from lmforge.data.readers import Document, read_documents
from lmforge.errors import UserError
from lmforge.files import atomic_directory
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

SHARDS_FORMAT = "lmforge-shards-v1"
SPLITS = ("train", "val")
META_FILE = "meta.json"
QUALITY_FILE = "quality.json"
_BATCH_CHARS = 1 << 20  # text tokenized per encode_batch call
# a single document is held out by sections: its headings, else its blank-line breaks
HEADING = re.compile(r"^[ \t]*(?:ACT|Act|SCENE|Scene|CHAPTER|Chapter|BOOK|Book|PART|Part)[ \t]+(?:[IVXLC]+|\d+)\b",
                     re.MULTILINE)
BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
MIN_SECTIONS = 4
MIN_SECTION_CHARS = 200


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary: uint16 up to 65,536 tokens."""
    if not isinstance(vocab_size, (int, np.integer)) or not 0 < vocab_size <= 2**32:
        raise UserError(f"vocab_size must be an integer in 1..{2**32}, got {vocab_size!r}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val), holding out whole documents for validation.

    Documents are visited in the order of the SHA-1 of their names and go to validation until it
    holds `val_fraction` of the characters (a document that would overshoot twice that is passed
    over), so the choice is deterministic and stable when documents are added. There is always at
    least one validation and one training document.

    A single document (one text file) is cut into sections where it has them (`sections`): at its
    headings (ACT, SCENE, CHAPTER, BOOK, PART followed by a number), else at its runs of two or more
    blank lines; whole sections are held out as above, and each run of consecutive sections of one
    split becomes one document, "NAME#FIRST-LAST" (section numbers). A document without sections is
    cut at the line break nearest `1 - val_fraction` of its length into "NAME[train]" and "NAME[val]".
    """
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}")
    if not docs:
        raise UserError("no documents to prepare")
    if len(docs) == 1:
        parts = sections(docs[0])
        if len(parts) < MIN_SECTIONS:
            return _split_one(docs[0], val_fraction)
        train_parts, val_parts = split_documents(parts, val_fraction)
        return _joined(train_parts, docs[0].name), _joined(val_parts, docs[0].name)
    total = sum(len(d.text) for d in docs)
    target = val_fraction * total
    order = sorted(range(len(docs)), key=lambda i: (hashlib.sha1(docs[i].name.encode("utf-8")).hexdigest(), i))
    val: set[int] = set()
    val_chars = 0
    for i in order:
        if val_chars >= target or len(val) == len(docs) - 1:
            break
        size = len(docs[i].text)
        if val_chars + size <= 2 * target:
            val.add(i)
            val_chars += size
    if not val:  # every document is far bigger than the target: take the smallest
        val.add(min(order, key=lambda i: len(docs[i].text)))
    train_docs = [d for i, d in enumerate(docs) if i not in val]
    val_docs = [d for i, d in enumerate(docs) if i in val]
    return train_docs, val_docs


def sections(doc: Document) -> list[Document]:
    """`doc` cut before each of its headings (a line starting "ACT", "SCENE", "CHAPTER", "BOOK" or "PART"
    and a number), or where it has fewer than MIN_SECTIONS of them, at each run of two or more blank
    lines; each section named "NAME#N" (N from 1). A section shorter than MIN_SECTION_CHARS joins the
    next (an "ACT II." line joins its first scene). The sections' texts add up to the document's."""
    cuts = [m.start() for m in HEADING.finditer(doc.text)]
    if len(cuts) < MIN_SECTIONS:
        cuts = [m.end() for m in BLANK_LINES.finditer(doc.text)]
    pieces, start = [], 0
    for cut in [*cuts, len(doc.text)]:
        if cut - start >= MIN_SECTION_CHARS or cut == len(doc.text):
            pieces.append(doc.text[start:cut])
            start = cut
    if len(pieces) > 1 and len(pieces[-1]) < MIN_SECTION_CHARS:
        pieces[-2:] = [pieces[-2] + pieces[-1]]
    return [Document(f"{doc.name}#{i}", text) for i, text in enumerate(pieces, 1) if text]


def _joined(parts: list[Document], name: str) -> list[Document]:
    """Runs of consecutive sections ("NAME#N") as one document each, "NAME#FIRST-LAST"."""
    runs: list[list[Document]] = []
    for part in sorted(parts, key=_section_number):
        if runs and _section_number(part) == _section_number(runs[-1][-1]) + 1:
            runs[-1].append(part)
        else:
            runs.append([part])
    return [Document(f"{name}#{_section_number(run[0])}" + (f"-{_section_number(run[-1])}" if len(run) > 1 else ""),
                     "".join(d.text for d in run)) for run in runs]


def _section_number(doc: Document) -> int:
    return int(doc.name.rpartition("#")[2])


def _split_one(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    text = doc.text
    if len(text) < 2:
        raise UserError(f"only one document ({doc.name}) and it is too short to split into train and val")
    target = round(len(text) * (1 - val_fraction))
    # cut just after a line break, else after a space, else anywhere; both parts non-empty
    for sep in ("\n", " "):
        cuts = [text.rfind(sep, 0, target) + 1, text.find(sep, target) + 1]
        cuts = [c for c in cuts if 0 < c < len(text)]
        if cuts:
            cut = min(cuts, key=lambda c: abs(c - target))
            break
    else:
        cut = min(max(target, 1), len(text) - 1)
    return [Document(f"{doc.name}[train]", text[:cut])], [Document(f"{doc.name}[val]", text[cut:])]


def prepare(
    source: str | Path | list[Document],
    tokenizer: Tokenizer,
    out: str | Path,
    val_fraction: float = 0.1,
    text_field: str = "text",
    overwrite: bool = False,
    show_progress: bool = True,
    source_name: str | None = None,
    quality: dict | None = None,
) -> dict:
    """Tokenize documents into `out/{train,val}.bin` + `meta.json` + `tokenizer.json`; return the meta.

    `source` is anything `read_documents` takes (file, directory, glob) or a list of Documents;
    `source_name` is recorded in meta.json instead of the path (e.g. a catalog name). `quality` is
    the report of `quality.clean` on these documents: the leakage check of the split is added to it
    (`quality["leakage"]`) and it is written as `quality.json`. An `out` that already holds prepared
    data is replaced only with `overwrite=True`, and only once the new data is complete.
    """
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be an lmforge Tokenizer, got {type(tokenizer).__name__}")
    out = Path(out)
    _check_out(out, overwrite)
    if isinstance(source, (str, Path)):
        docs = read_documents(source, text_field=text_field)
        source_str = source_name or str(source)
    else:
        docs = list(source)
        source_str = source_name or f"{len(docs)} documents"
    train_docs, val_docs = split_documents(docs, val_fraction)
    if quality is not None:
        config = CleanConfig(**quality["config"])
        quality["leakage"] = leakage([d.text for d in train_docs], [d.text for d in val_docs], config)
    dtype = token_dtype(tokenizer.vocab_size)
    tokenizer_json = tokenizer.to_json()

    with atomic_directory(out) as tmp:
        counts = {}
        with tqdm(total=len(docs), unit="doc", desc="tokenizing", disable=not show_progress) as bar:
            for split, split_docs in zip(SPLITS, (train_docs, val_docs), strict=True):
                counts[split] = _write_tokens(tmp / f"{split}.bin", split_docs, tokenizer, dtype, bar)
        fingerprint = hashlib.sha256()
        for split, split_docs in zip(SPLITS, (train_docs, val_docs), strict=True):
            for d in split_docs:
                name, text = d.name.encode("utf-8"), d.text.encode("utf-8")
                fingerprint.update(f"{split}\0{len(name)}\0{len(text)}\0".encode())
                fingerprint.update(name + text)
        fingerprint.update(tokenizer_json.encode("utf-8"))
        meta = {
            "format": SHARDS_FORMAT,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "train_bytes": sum(len(d.text.encode("utf-8")) for d in train_docs),
            "val_bytes": sum(len(d.text.encode("utf-8")) for d in val_docs),
            "train_documents": [d.name for d in train_docs],
            "val_documents": [d.name for d in val_docs],
            "val_fraction": val_fraction,
            "fingerprint": fingerprint.hexdigest(),
            "tokenizer": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
            "source": source_str,
        }
        crypto.write_bytes(tmp / TOKENIZER_FILE, tokenizer_json)  # every file encrypted while a writing key is set
        crypto.write_bytes(tmp / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        if quality is not None:
            crypto.write_bytes(tmp / QUALITY_FILE, json.dumps(quality, indent=2, ensure_ascii=False) + "\n")
        _check_out(out, overwrite)  # the directory may have changed while we tokenized
    return meta


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an empty directory or (with overwrite) prepared data."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose a new --out")
    if (out / META_FILE).is_file():
        if not overwrite:
            raise UserError(f"{out} already holds prepared data; pass --overwrite (or a new --out) to replace it")
    elif any(out.iterdir()):
        raise UserError(f"{out} exists, is not empty and holds no prepared data; choose a new --out")


def _write_tokens(path: Path, docs: list[Document], tokenizer: Tokenizer, dtype: np.dtype, bar: tqdm) -> int:
    """Append each document's ids and the end-of-text id to `path`; return the number of tokens."""
    n = 0
    with crypto.open_writer(path) as f:
        for batch in _batches(docs):
            ids = tokenizer.encode_batch([d.text for d in batch])
            for doc_ids in ids:
                doc_ids.append(tokenizer.eos_id)
                f.write(np.asarray(doc_ids, dtype=dtype).tobytes())
                n += len(doc_ids)
            bar.update(len(batch))
    return n


def _batches(docs: list[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class TokenShards:
    """Prepared token data in a directory: `meta`, `tokenizer` and the memory-mapped splits."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not self.directory.is_dir():
            raise UserError(f"no such data directory: {self.directory}")
        if not meta_path.is_file():
            raise UserError(f"{self.directory} holds no prepared data (no {META_FILE}); run `lmforge prepare` first")
        try:
            meta = json.loads(crypto.read_bytes(meta_path))
        except UnicodeDecodeError:
            raise UserError(f"{meta_path} is not UTF-8 text; prepare the data again") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{meta_path} line {e.lineno}: not valid JSON ({e.msg}); prepare the data again") from None
        if not isinstance(meta, dict) or meta.get("format") != SHARDS_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise UserError(f"{meta_path} is not lmforge token shards (format {found!r}, expected {SHARDS_FORMAT!r})")
        for key in ("dtype", "vocab_size", "eos_id", "train_tokens", "val_tokens", "tokenizer"):
            if key not in meta:
                raise UserError(f"{meta_path} has no field {key!r}; prepare the data again")
        if meta["dtype"] not in ("uint16", "uint32"):
            raise UserError(f"{meta_path}: dtype {meta['dtype']!r} is not uint16 or uint32")
        self.meta: dict = meta
        self.dtype = np.dtype(meta["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were made with (checked against meta.json's hash)."""
        file = self.directory / TOKENIZER_FILE
        if file.is_file() and hashlib.sha256(crypto.read_bytes(file)).hexdigest() != self.meta["tokenizer"]:
            raise UserError(f"{file} is not the tokenizer these shards were made with; prepare the data again")
        return Tokenizer.load(file if file.is_file() else self.directory)

    def num_tokens(self, split: str) -> int:
        """Number of tokens in a split, from meta.json."""
        self._check_split_name(split)
        return int(self.meta[f"{split}_tokens"])

    def split(self, name: str) -> np.ndarray:
        """The token ids of "train" or "val" as a 1-D read-only memory map (encrypted shards: a read-only
        array decrypted in memory)."""
        n = self.num_tokens(name)
        path = self.directory / f"{name}.bin"
        if not path.is_file():
            raise UserError(f"{path} is missing; prepare the data again")
        encrypted = crypto.is_encrypted(path)
        size = crypto.plaintext_size(path) if encrypted else path.stat().st_size
        if size != n * self.dtype.itemsize:
            raise UserError(
                f"{path} holds {size // self.dtype.itemsize} tokens but {META_FILE} says {n}; prepare the data again"
            )
        if n == 0:  # mmap cannot map an empty file; prepare never writes one
            raise UserError(f"{name} split of {self.directory} is empty; prepare the data again")
        if encrypted:
            tokens = np.frombuffer(crypto.read_bytes(path), dtype=self.dtype)
            tokens.flags.writeable = False
            return tokens
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))

    def check_length(self, split: str, block_size: int) -> None:
        """Raise UserError unless `split` holds at least block_size + 1 tokens (one training window)."""
        n = self.num_tokens(split)
        if n < block_size + 1:
            raise UserError(
                f"{split} split of {self.directory} has {n} tokens; need at least {block_size + 1} "
                f"(block_size + 1; lower --block-size or give more text)"
            )

    def _check_split_name(self, split: str) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")

    def __repr__(self) -> str:
        return (
            f"TokenShards({str(self.directory)!r}, train_tokens={self.meta['train_tokens']}, "
            f"val_tokens={self.meta['val_tokens']}, dtype={self.dtype.name})"
        )
