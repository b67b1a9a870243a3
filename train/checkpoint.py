"""Resumable checkpoints (atomic writes, keep-last-k, fall back past a broken one) and export.

A checkpoint is one file `RUN_DIR/checkpoints/step-00000123.pt` holding the model, optimizer,
scheduler and grad-scaler state, the step, the config, and per rank the RNG states, the data
stream's position and the skip counts. It is written to a temporary file, fsynced, renamed, and
the directory fsynced, so a crash leaves either the old or the new file, never half of one; a
newest file that is unreadable anyway (a disk fault, a copy cut short) is passed over for the
one before it, with a warning naming it.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.artifact import write_artifact
from common.model import DualEncoder

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step-{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`; delete all but the newest keep_last."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(ckpt_dir, step)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=ckpt_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    for stale in ckpt_dir.glob(".step-*.pt.*"):  # temp files of a save that was killed
        stale.unlink(missing_ok=True)
    return path


def load_latest(ckpt_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads; unreadable newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a checkpoint: no step")
        except Exception as exc:  # a truncated or corrupt file: any unpickling error
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
            continue
        return state, path
    return None


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG a rank draws from: Python's, NumPy's, torch's CPU one and its CUDA device's."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what `rng_state` saved (the CUDA state only onto a CUDA device)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def export_model(model: DualEncoder, out_dir: Path, provenance: dict[str, Any]) -> Path:
    """Write the inference artifact (see common/artifact.py) for the trained model."""
    return write_artifact(model, out_dir, provenance=provenance)
