"""common/atomic_dir.py: one way to replace a directory, used by indices, artifacts and ONNX."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from common import atomic_dir
from common.atomic_dir import remove_stale, replace_dir, staging_dir


def write(directory: Path, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "file.txt").write_text(text)
    return directory


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_dir_puts_the_new_directory_in_place_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
):
    if not exchange:
        monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)
    target = tmp_path / "thing"
    replace_dir(write(staging_dir(target), "one"), target)
    assert (target / "file.txt").read_text() == "one"
    replace_dir(write(staging_dir(target), "two"), target)
    assert (target / "file.txt").read_text() == "two"
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)  # readable by a service's user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_a_kill_between_the_two_renames_is_undone_by_the_next_writer(tmp_path: Path):
    """The fallback moves the old directory aside, then renames the new one in: killed in
    between, no `target` exists; the next `staging_dir` puts the old one back."""
    target = write(tmp_path / "thing", "old")
    host = socket.gethostname().replace("-", "_")
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    aside = tmp_path / f".thing.old-{host}-{dead_pid}-x"
    aside.mkdir()
    os.replace(target, aside / "thing")
    killed_build = write(tmp_path / f".thing.build-{host}-{dead_pid}-y", "half")
    assert not target.exists()
    staging = staging_dir(target)
    assert (target / "file.txt").read_text() == "old"
    assert not aside.exists() and not killed_build.exists()
    assert staging.is_dir()


def test_staging_directories_of_live_writers_and_other_hosts_are_kept(tmp_path: Path):
    target = tmp_path / "thing"
    host = socket.gethostname().replace("-", "_")
    mine = tmp_path / f".thing.build-{host}-{os.getpid()}-live"
    theirs = tmp_path / ".thing.build-otherhost-1-x"
    mine.mkdir()
    theirs.mkdir()
    remove_stale(target)
    assert mine.is_dir() and theirs.is_dir()
