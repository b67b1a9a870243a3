"""Checkpoints: atomic, keep-last-k, and a broken newest one falls back to the previous."""

import logging
import random

import numpy as np
import pytest
import torch

from train.checkpoint import (
    list_checkpoints,
    load_latest,
    rng_state,
    save_checkpoint,
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
