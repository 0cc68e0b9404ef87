"""Writing results so that a crash never leaves half of them: a directory is built aside, then renamed into place.

    with atomic_directory(Path("runs/x/checkpoint")) as tmp:
        save_file(weights, tmp / "model.safetensors")
        ...                      # on success tmp replaces runs/x/checkpoint; on error it is removed
"""

from __future__ import annotations

import ctypes
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
def atomic_directory(target: Path) -> Iterator[Path]:
    """An empty temporary directory beside `target` that replaces `target` when the block succeeds.

    Its files get ordinary permissions (what the umask allows; temporary files start owner-only).
    An existing `target` is kept until the new one is in place, and put back if the swap fails.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        mask = current_umask()
        os.chmod(tmp, 0o777 & ~mask)
        for file in tmp.rglob("*"):
            os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~mask)
        _replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):  # one atomic step: `target` is never missing, even if the process dies here
        shutil.rmtree(new, ignore_errors=True)  # now the old contents
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux's renameat2 with RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def check_new_directory(out: Path, flag: str = "--out") -> None:
    """Refuse an output directory that already holds something: nothing written before is overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another {flag} (nothing was written)")
