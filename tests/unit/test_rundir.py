"""Run directory ownership: one run at a time, stale locks taken over, no silent reuse."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from train.rundir import LOCK_FILE, RunDirError, acquire_lock, check_reuse


def test_a_second_lock_is_refused_naming_the_holder(tmp_path: Path):
    held = acquire_lock(tmp_path)
    try:
        # flock locks belong to an open file: a second open conflicts, in this process too
        with pytest.raises(RunDirError, match=rf"in use by another run \(pid {os.getpid()} on "):
            acquire_lock(tmp_path)
    finally:
        held.release()
    acquire_lock(tmp_path).release()  # free again once released


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path, caplog):
    dead = {"host": "node7", "pid": 999999, "started": "2026-01-01T00:00:00Z"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(dead))  # the kernel lock died with it
    with caplog.at_level(logging.WARNING):
        lock = acquire_lock(tmp_path)
    assert "taking over" in caplog.text and "pid 999999 on host node7" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_reusing_a_run_dir_needs_resume_or_overwrite(tmp_path: Path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-00000040.pt").write_bytes(b"an earlier run's")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="step-00000040.pt.*--resume.*--overwrite"):
        check_reuse(tmp_path, resume=False, overwrite=False)
    check_reuse(tmp_path, resume=True, overwrite=False)  # continuing it is fine
    assert (tmp_path / "metrics.jsonl").exists()
    check_reuse(tmp_path, resume=False, overwrite=True)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    check_reuse(tmp_path, resume=False, overwrite=False)  # nothing left to protect
