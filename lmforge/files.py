"""Writing results so that a crash never leaves half of them: a directory is built aside, then renamed into place.

    with atomic_directory(Path("runs/x/checkpoint")) as tmp:
        save_file(weights, tmp / "model.safetensors")
        ...                      # on success tmp replaces runs/x/checkpoint; on error it is removed

Durability: before the rename every file and directory of the new tree is fsynced, and after it the
parent directory, so a power cut cannot leave a name pointing at unwritten data.

Where `target` already exists, the swap is one atomic step on Linux (renameat2 RENAME_EXCHANGE);
elsewhere it takes two renames, with a moment in between where `target` is missing and its old
version sits beside it. With `previous=` (the Trainer's `checkpoint.prev/`) that moment is harmless:
the old version is moved to `previous`, a name readers know, and stays there as a spare.
Temporary and old copies are hidden siblings, `.NAME.tmp-*` and `.NAME.old-*`; `remove_leftovers`
deletes those a crash left behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: Path, previous: Path | None = None) -> Iterator[Path]:
    """An empty temporary directory beside `target` that replaces `target` when the block succeeds.

    Its files get ordinary permissions (what the umask allows; temporary files start owner-only) and
    are fsynced before the rename. An existing `target` is kept until the new one is in place, and
    put back if the swap fails. It is then deleted, or with `previous` (a sibling path) moved there,
    replacing what `previous` held.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _finish_tree(tmp)
        _replace_directory(tmp, target, previous)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish_tree(directory: Path) -> None:
    """Give the tree ordinary permissions and fsync it, deepest entries first, the directory itself last."""
    mask = current_umask()
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        fsync_path(path)
    os.chmod(directory, 0o777 & ~mask)
    fsync_path(directory)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk (directories: where the system can)."""
    is_dir = path.is_dir()
    if os.name == "nt" and is_dir:
        return  # Windows cannot open a directory to fsync it
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (is_dir and e.errno in (errno.EINVAL, errno.ENOTSUP)):  # some network filesystems refuse it
            raise
    finally:
        os.close(fd)


def _replace_directory(new: Path, target: Path, previous: Path | None) -> None:
    """Put `new` in place of `target`; the old `target` goes to `previous`, or is deleted without one.

    At every moment `target` or `previous` holds a complete version (unless neither existed)."""
    if not target.exists():
        os.replace(new, target)  # a `previous` left by a crash between the renames stays as the spare
        fsync_path(target.parent)
        return
    spare, discarded = previous or _hidden_sibling(target, "old"), None
    if previous is not None and previous.exists():
        discarded = _hidden_sibling(target, "old")
        os.replace(previous, discarded)  # `target` is still complete
    if _exchange(new, target):  # one atomic step: `target` is never missing, even if the process dies here
        os.replace(new, spare)
    else:
        os.replace(target, spare)  # a crash here leaves the old version in `spare`
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(spare, target)
            if discarded is not None:
                os.replace(discarded, previous)
            raise
    fsync_path(target.parent)
    for path in (discarded, None if previous else spare):
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def _hidden_sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux's renameat2 with RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def remove_leftovers(target: Path, previous: Path | None = None) -> None:
    """Delete the hidden copies of `target` that a killed process left beside it: temporary ones, and
    old ones once `target` or `previous` exists (else a hidden old copy may be the only one: it is kept).

    Only where no other process is writing `target` (the Trainer calls it when resuming a run)."""
    patterns = [f".{target.name}.tmp-*"]
    if target.exists() or (previous is not None and previous.exists()):
        patterns.append(f".{target.name}.old-*")
    for pattern in patterns:
        for path in target.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def check_new_directory(out: Path, flag: str = "--out") -> None:
    """Refuse an output directory that already holds something: nothing written before is overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another {flag} (nothing was written)")
