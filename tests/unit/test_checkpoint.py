"""Checkpoints: atomic, keep-last-k, and a broken newest one falls back to the previous."""

import logging

import torch

from train.checkpoint import list_checkpoints, load_latest, save_checkpoint


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
