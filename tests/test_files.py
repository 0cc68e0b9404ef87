"""Atomic result directories: a new directory replaces the old one whole, or not at all; it is on
the disk (fsynced) before its name is; with `previous`, the old version is kept there, and a crash at
any moment leaves a whole version under one of the two names, with or without RENAME_EXCHANGE."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lmforge import files
from lmforge.errors import UserError
from lmforge.files import atomic_directory, check_new_directory, remove_leftovers


@pytest.fixture(params=["exchange", "two renames"])
def swap(request, monkeypatch) -> str:
    """Both ways of swapping directories: RENAME_EXCHANGE, and the two renames where it is missing."""
    if request.param == "two renames":
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    return request.param


def test_atomic_directory_replaces_the_old_one_whole(tmp_path: Path, swap: str) -> None:
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


def test_atomic_directory_fsyncs_the_tree_before_the_rename_and_the_parent_after(tmp_path, monkeypatch) -> None:
    events = []
    rename = os.replace
    monkeypatch.setattr(files, "fsync_path", lambda path: events.append(("fsync", Path(path))))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(a), Path(b))), rename(a, b)))
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("b")
        (tmp / "a").write_text("a")
    order = [event[1] for event in events]
    assert events[-2:] == [("rename", tmp, target), ("fsync", tmp_path)]
    assert set(order[:-2]) == {tmp / "a", tmp / "sub", tmp / "sub" / "b", tmp}
    assert order.index(tmp / "sub" / "b") < order.index(tmp / "sub") < order.index(tmp) == len(order) - 3


def test_previous_keeps_the_version_before(tmp_path: Path, swap: str) -> None:
    target, previous = tmp_path / "checkpoint", tmp_path / "checkpoint.prev"
    for version in ("one", "two", "three"):
        with atomic_directory(target, previous) as tmp:
            (tmp / "weights").write_text(version)
    assert (target / "weights").read_text() == "three" and (previous / "weights").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.prev"]


def test_a_crash_at_any_moment_of_a_swap_leaves_a_whole_version(tmp_path: Path, swap: str, monkeypatch) -> None:
    """After each rename of a swap, the directory as a crash would leave it: `checkpoint/` or
    `checkpoint.prev/` holds a whole version (the new or the old one), hidden copies aside."""
    parent = tmp_path / "run"
    target, previous = parent / "checkpoint", parent / "checkpoint.prev"
    for version in ("one", "two"):
        with atomic_directory(target, previous) as tmp:
            (tmp / "weights").write_text(version)
    moments = []
    rename = os.replace

    def rename_and_look(a, b) -> None:
        rename(a, b)
        moments.append({p.name: (p / "weights").read_text() for p in (target, previous) if p.exists()})

    monkeypatch.setattr(os, "replace", rename_and_look)
    with atomic_directory(target, previous) as tmp:
        (tmp / "weights").write_text("three")
    assert len(moments) == (2 if swap == "exchange" else 3)
    for moment in moments:
        newest = moment.get("checkpoint", moment.get("checkpoint.prev"))
        assert newest in ("two", "three"), moments
    if swap == "two renames":  # the moment between the renames: the old version under `previous`
        assert moments[1] == {"checkpoint.prev": "two"}
    assert moments[-1] == {"checkpoint": "three", "checkpoint.prev": "two"}


def test_a_failed_swap_puts_everything_back(tmp_path: Path, monkeypatch) -> None:
    target, previous = tmp_path / "checkpoint", tmp_path / "checkpoint.prev"
    for version in ("one", "two"):
        with atomic_directory(target, previous) as tmp:
            (tmp / "weights").write_text(version)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    rename = os.replace

    def no_room_for_the_new_one(a, b) -> None:
        if Path(b) == target and Path(a).name.startswith(".checkpoint.tmp-"):
            raise OSError(28, "No space left on device")
        rename(a, b)

    monkeypatch.setattr(os, "replace", no_room_for_the_new_one)
    with pytest.raises(OSError, match="No space"):
        with atomic_directory(target, previous) as tmp:
            (tmp / "weights").write_text("three")
    assert (target / "weights").read_text() == "two" and (previous / "weights").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.prev"]


def test_remove_leftovers_keeps_a_hidden_copy_that_is_the_only_one(tmp_path: Path) -> None:
    target = tmp_path / "best"
    for name in (".best.tmp-x1", ".best.old-y2", ".other.tmp-z3"):
        (tmp_path / name).mkdir()
    remove_leftovers(target)  # no `best/`: its old copy (a crash between two renames) is all there is
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.old-y2", ".other.tmp-z3"]
    shutil.copytree(tmp_path / ".best.old-y2", target)
    remove_leftovers(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-z3", "best"]
