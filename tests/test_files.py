"""Atomic result directories: a new directory replaces the old one whole, or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmforge.errors import UserError
from lmforge.files import atomic_directory, check_new_directory


def test_atomic_directory_replaces_the_old_one_whole(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"
    for version in ("one", "two"):
        with atomic_directory(target) as tmp:
            assert not target.exists() or (target / "weights").read_text() != version  # not yet in place
            (tmp / "weights").write_text(version)
            (tmp / "sub").mkdir()
    assert (target / "weights").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary or old directory left
    assert oct(os.stat(target / "weights").st_mode & 0o777) == oct(0o666 & ~_umask())


def test_a_failed_write_keeps_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_check_new_directory_refuses_a_non_empty_one(tmp_path: Path) -> None:
    check_new_directory(tmp_path / "new")
    check_new_directory(tmp_path)  # empty: fine
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(UserError, match="already exists and is not empty; choose another --out"):
        check_new_directory(tmp_path)
    assert (tmp_path / "x").read_text() == "keep me"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
