"""Checkpoints: atomic, keep-last-k, and a broken newest one falls back to the previous."""

import logging
import random
import subprocess

import numpy as np
import pytest
import torch

from train.checkpoint import (
    keep_as_last_good,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_aside_newer,
    set_rng_state,
)


def test_keep_last_k_and_load_latest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), step)}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030.pt", "step-00000040.pt"]
    state, path = load_latest(tmp_path)
    assert state["step"] == 40 and path.name == "step-00000040.pt"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    save_checkpoint(tmp_path, 1, {"step": 1}, keep_last=3)
    newest = save_checkpoint(tmp_path, 2, {"step": 2, "w": torch.zeros(1000)}, keep_last=3)
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        state, path = load_latest(tmp_path)
    assert state["step"] == 1
    assert "unreadable" in caplog.text and newest.name in caplog.text


def test_no_checkpoint(tmp_path):
    assert load_latest(tmp_path / "nothing") is None


def test_any_unreadable_newer_checkpoints_are_passed_over(tmp_path, caplog):
    save_checkpoint(tmp_path, 1, {"step": 1}, keep_last=5)
    empty = save_checkpoint(tmp_path, 2, {"step": 2}, keep_last=5)
    empty.write_bytes(b"")  # e.g. a copy cut short
    garbage = save_checkpoint(tmp_path, 3, {"step": 3}, keep_last=5)
    garbage.write_bytes(b"\x80\x04 not a pickle at all")
    foreign = save_checkpoint(tmp_path, 4, {"weights": torch.zeros(2)}, keep_last=5)  # no step
    with caplog.at_level(logging.WARNING):
        state, path = load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "step-00000001.pt"
    assert all(p.name in caplog.text for p in (empty, garbage, foreign))


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1}, keep_last=1)
    with pytest.raises(Exception, match="pickle"):
        save_checkpoint(tmp_path, 2, {"step": 2, "bad": lambda: None}, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]
    (tmp_path / ".step-00000003.pt.abc123").write_bytes(b"half a file")  # a killed save's temp
    save_checkpoint(tmp_path, 3, {"step": 3}, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003.pt"]


def test_rng_states_round_trip():
    device = torch.device("cpu")
    saved = rng_state(device)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move on
    set_rng_state(saved, device)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_keep_last_counts_only_readable_checkpoints(tmp_path, caplog):
    """A garbage newest file is set aside, not kept in place of a good one."""
    save_checkpoint(tmp_path, 1, {"step": 1}, keep_last=1)
    (tmp_path / "step-00000005.pt").write_bytes(b"garbage")  # newer than what comes next
    with caplog.at_level(logging.WARNING):
        save_checkpoint(tmp_path, 2, {"step": 2}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002.pt"]
    assert (tmp_path / "step-00000005.pt.unreadable").is_file()
    assert "step-00000005.pt is unreadable" in caplog.text
    assert load_latest(tmp_path)[0]["step"] == 2


def test_last_good_survives_rotation_and_newer_ones_can_be_set_aside(tmp_path):
    good = save_checkpoint(tmp_path, 4, {"step": 4}, keep_last=1)
    kept = keep_as_last_good(tmp_path, good)
    for step in (6, 8):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=1)
    assert not good.exists() and load_checkpoint(kept)["step"] == 4
    assert [p.name for p in set_aside_newer(tmp_path, 4)] == ["step-00000008.pt"]
    assert list_checkpoints(tmp_path) == [] and (tmp_path / "abandoned/step-00000008.pt").is_file()
    with pytest.raises(ValueError, match="step-00000009.pt does not exist"):
        load_checkpoint(tmp_path / "step-00000009.pt")


def test_a_full_disk_is_reported_as_such(tmp_path):
    """A 64 KiB tmpfs fills up mid-write: the error says so, and no temp file is left."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(OSError, match="no space left on the device of .* step-00000001.pt"):
            save_checkpoint(mount, 1, {"step": 1, "w": torch.zeros(100_000)}, keep_last=1)
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)
