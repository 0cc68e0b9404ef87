"""Reading local files: .txt/.md, .jsonl, .csv and .parquet, as text documents or as records.

    docs = read_documents("corpus/")                  # every supported file inside, recursively
    docs = read_documents("data/*.jsonl", text_field="body")
    rows = read_split(Path("my_data/"), "validation")  # records (dicts) of the folder's validation file

A .txt or .md file is one document; each record of a .jsonl, .csv or .parquet file is one document
(named "file.jsonl:LINE"). Any mistake in the input (a missing file, a line that is not JSON, a
missing column, bytes that are not UTF-8) raises `UserError` with the file and line in its message.
Named datasets (the catalog) are read by `lmforge.data.datasets`, which builds on this module.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from lmforge.errors import UserError
from lmforge.perf import cache_dir

SUPPORTED_EXTENSIONS = (".txt", ".md", ".jsonl", ".csv", ".parquet")
SPLIT_FILE_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
"""The file stems (any supported extension) that hold each split of a local dataset folder."""
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Document:
    """One unit of text: a whole file, or one record of a .jsonl/.csv/.parquet file."""

    name: str
    text: str


default_cache_dir = cache_dir  # where downloads and caches go: $LMFORGE_CACHE, else ~/.cache/lmforge


def read_documents(source: str | Path, text_field: str = "text") -> list[Document]:
    """Documents from a file, a directory (recursively, sorted) or a glob pattern.

    `text_field` names the JSON field / CSV or Parquet column holding the text. Records whose text
    is empty are skipped; a file with no text at all is an error.
    """
    files, base = _resolve(source)
    docs: list[Document] = []
    for file in files:
        name = file.relative_to(base).as_posix()
        docs.extend(_read_file(file, name, text_field))
    return docs


def _resolve(source: str | Path) -> tuple[list[Path], Path]:
    """The files named by `source`, and the directory their document names are relative to."""
    supported = ", ".join(SUPPORTED_EXTENSIONS)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; supported: {supported}")
        return [path], path.parent
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUPPORTED_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"directory {path} has no supported files ({supported})")
        return files, path
    if _GLOB_CHARS & set(str(source)):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"no files match {source}")
        files = [p for p in matches if p.suffix.lower() in SUPPORTED_EXTENSIONS]
        if not files:
            raise UserError(f"no supported files match {source} (supported: {supported})")
        # names are relative to the pattern's fixed leading folders: "data/**/*.txt" -> "sub/a.txt"
        fixed = list(itertools.takewhile(lambda part: not _GLOB_CHARS & set(part), path.parts))
        return files, Path(*fixed) if fixed else Path()
    raise UserError(f"no such file or directory: {source}")


def _read_file(file: Path, name: str, text_field: str) -> list[Document]:
    ext = file.suffix.lower()
    if ext == ".parquet":
        return _read_parquet(file, name, text_field)
    text = _read_utf8(file)
    if not text.strip():
        raise UserError(f"{file} is empty")
    if ext in (".txt", ".md"):
        return [Document(name, text.replace("\r\n", "\n"))]
    docs = _read_jsonl(file, name, text, text_field) if ext == ".jsonl" else _read_csv(file, name, text, text_field)
    if not docs:
        raise UserError(f"{file} is empty: no record has any text in {text_field!r}")
    return docs


def _read_utf8(file: Path) -> str:
    """The file's text, strictly UTF-8 (a leading byte-order mark is dropped)."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{file} is not UTF-8 text: invalid byte 0x{data[e.start]:02x} at line {line}") from None
    return text.removeprefix("\ufeff")


def jsonl_records(file: Path, text: str) -> Iterable[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file's text."""
    # split on "\n" only: str.splitlines would also split on U+2028 etc., legal inside JSON strings
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{file} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{file} line {n}: expected a JSON object, got {type(record).__name__}")
        yield n, record


def _read_jsonl(file: Path, name: str, text: str, text_field: str) -> list[Document]:
    docs = []
    for n, record in jsonl_records(file, text):
        value = record.get(text_field)
        if not isinstance(value, str):
            raise UserError(f"{file} line {n}: no string field {text_field!r} (fields: {_names(record)})")
        if value:
            docs.append(Document(f"{name}:{n}", value))
    return docs


def read_jsonl_records(source: str | Path) -> list[tuple[str, dict]]:
    """("file.jsonl:LINE", object) for every record of the .jsonl files named by `source`."""
    files, base = _resolve(source)
    records = []
    for file in files:
        if file.suffix.lower() != ".jsonl":
            raise UserError(f"{file}: expected a .jsonl file of records")
        text = _read_utf8(file)
        name = file.relative_to(base).as_posix()
        records.extend((f"{name}:{n}", record) for n, record in jsonl_records(file, text))
        if not records:
            raise UserError(f"{file} is empty")
    return records


def _read_csv(file: Path, name: str, text: str, text_field: str) -> list[Document]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # fields can be whole documents
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        if text_field not in header:
            raise UserError(f"{file} has no column {text_field!r} (columns: {_names(header)})")
        column = header.index(text_field)
        docs = []
        line = reader.line_num  # last line of the previous record
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row:
                continue
            if len(row) <= column:
                raise UserError(
                    f"{file} line {start}: row has {len(row)} fields, no value for column {text_field!r} "
                    f"(field {column + 1} of {len(header)})"
                )
            if row[column]:
                docs.append(Document(f"{name}:{start}", row[column]))
    except csv.Error as e:
        raise UserError(f"{file} line {reader.line_num}: not valid CSV ({e})") from None
    return docs


def require_pyarrow(file: Path) -> ModuleType:
    """The `pyarrow` module (with `pyarrow.parquet` loaded) to read `file`, or a UserError naming the extra."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (loads the submodule: pyarrow.parquet below)
    except ImportError:
        raise UserError(f"reading {file} needs pyarrow: pip install 'lmforge[parquet]'") from None
    return pyarrow


def _read_parquet(file: Path, name: str, text_field: str) -> list[Document]:
    pa = require_pyarrow(file)
    pq = pa.parquet
    try:
        if file.stat().st_size == 0:
            raise UserError(f"{file} is empty")
        schema = pq.read_schema(file)
        if text_field not in schema.names:
            raise UserError(f"{file} has no column {text_field!r} (columns: {_names(schema.names)})")
        column_type = schema.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise UserError(f"{file}: column {text_field!r} holds {column_type}, expected strings")
        values = pq.read_table(file, columns=[text_field]).column(text_field).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{file} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    docs = [Document(f"{name}:{i}", v) for i, v in enumerate(values, start=1) if v]
    if not docs:
        raise UserError(f"{file} is empty: no row has any text in {text_field!r}")
    return docs


# ------------------------------------------------------------------------------------------------
# records: local data in the shapes of the catalog's datasets (`lmforge.data.load`)


def read_split(path: Path, split: str) -> list[dict]:
    """The records of split `split` of local data: a file (taken to be that split, whatever `split` says),
    a folder with files named by split (`SPLIT_FILE_NAMES`: the file of `split`), or a folder without
    them (the records of all its files, for any split)."""
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
    """The records of one .jsonl file (one JSON object a line), .csv (a dict of strings per row, by the
    header), .parquet (a dict per row) or .txt/.md file (one {"text"} record for the whole file)."""
    ext = file.suffix.lower()
    if ext == ".parquet":
        pa = require_pyarrow(file)
        try:
            return pa.parquet.read_table(file).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise UserError(f"{file} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    text = _read_utf8(file)
    if not text.strip():
        raise UserError(f"{file} is empty")
    if ext == ".jsonl":
        return [record for _, record in jsonl_records(file, text)]
    if ext == ".csv":
        return csv_dicts(file, text)
    if ext in (".txt", ".md"):
        return [{"text": text.replace("\r\n", "\n")}]
    raise UserError(f"{file}: unsupported file type {ext!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}")


def csv_dicts(file: Path, text: str) -> list[dict[str, str]]:
    """The rows of CSV `text` (read from `file`) as dicts keyed by its header row."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # fields can be whole documents
    try:
        return list(csv.DictReader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as e:
        raise UserError(f"{file}: not valid CSV ({e})") from None


def _names(items: Iterable[object], limit: int = 12) -> str:
    names = [str(k) for k in items]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return (", ".join(names[:limit]) or "none") + more
