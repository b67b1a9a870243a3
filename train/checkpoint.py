"""Resumable checkpoints (atomic writes, keep-last-k, fall back past a broken one) and export.

A checkpoint is one file `RUN_DIR/checkpoints/step-00000123.pt` holding the model, optimizer,
scheduler and grad-scaler state, the step, the config, and per rank the RNG states, the data
stream's position and the skip counts. It is written to a temporary file, fsynced, renamed, and
the directory fsynced, so a crash leaves either the old or the new file, never half of one; a
newest file that is unreadable anyway (a disk fault, a copy cut short) is passed over for the
one before it, with a warning naming it.

Keep-last counts only checkpoints that are readable (a whole zip archive with its pickle): an
unreadable one is renamed `step-N.pt.unreadable`, so it is neither kept in place of a good one
nor tried again. `last-good.pt` (a hard link) holds the checkpoint written before a run's first
non-finite step, out of rotation, to resume from after a blow-up.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.artifact import write_artifact
from common.hf_text import tokenizer_copier
from common.model import DualEncoder

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})\.pt$")
LAST_GOOD = "last-good.pt"
ABANDONED = "abandoned"
_MIN_FREE_BYTES = 16 * 1024 * 1024  # less left after a failed write: the disk was full


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step-{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`; keep the newest keep_last readable."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(ckpt_dir, step)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=ckpt_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        full = _disk_full(ckpt_dir, exc)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(
                errno.ENOSPC, f"no space left on the device of {ckpt_dir} to write {path.name}"
            ) from exc
        raise
    dir_fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    _rotate(ckpt_dir, keep_last, written=path)
    for stale in ckpt_dir.glob(".step-*.pt.*"):  # temp files of a save that was killed
        stale.unlink(missing_ok=True)
    return path


def _disk_full(directory: Path, exc: BaseException) -> bool:
    """Whether a failed write failed for want of space (torch reports it as its own error)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(directory).free < _MIN_FREE_BYTES
    except OSError:
        return False


def is_readable(path: Path) -> bool:
    """Whether `path` is a whole torch.save archive: its zip directory and its pickle record
    are present. Cheap (it reads the directory at the end of the file, not the tensors), and
    catches what rotation must not count: truncated copies, empty or foreign files."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _rotate(ckpt_dir: Path, keep_last: int, *, written: Path) -> None:
    """Delete all but the newest keep_last readable checkpoints; set unreadable ones aside."""
    readable = []
    for path in list_checkpoints(ckpt_dir):
        if path == written or is_readable(path):  # just written and fsynced: whole
            readable.append(path)
            continue
        aside = path.with_name(path.name + ".unreadable")
        log.warning("checkpoint %s is unreadable: renamed %s, not counted", path, aside.name)
        os.replace(path, aside)
    for old in readable[:-keep_last]:
        old.unlink(missing_ok=True)


def load_latest(ckpt_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads; unreadable newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = load_checkpoint(path)
        except ValueError as exc:  # a truncated or corrupt file
            log.warning("%s; trying the previous one", exc)
            continue
        return state, path
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in `path`; ValueError naming the file if it is missing or unreadable."""
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a checkpoint: no step")
    except Exception as exc:  # any unpickling error
        raise ValueError(f"checkpoint {path} is unreadable ({exc})") from exc
    return state


def keep_as_last_good(ckpt_dir: Path, path: Path) -> Path:
    """Make `ckpt_dir/last-good.pt` the checkpoint `path`, outside keep-last's rotation.

    A hard link: no copy, and it outlives the rotation's delete of `path`. Copied where the
    filesystem has no hard links.
    """
    target = ckpt_dir / LAST_GOOD
    tmp = ckpt_dir / f".{LAST_GOOD}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, target)
    return target


def set_aside_newer(ckpt_dir: Path, step: int) -> list[Path]:
    """Move checkpoints newer than `step` into ckpt_dir/abandoned/ (a resume from an earlier
    checkpoint: they belong to the run being abandoned, and would win keep-last over the new
    ones). Returns their new paths."""
    newer = [p for p in list_checkpoints(ckpt_dir) if _step_of(p) > step]
    moved = []
    for path in newer:
        (ckpt_dir / ABANDONED).mkdir(exist_ok=True)
        moved.append(ckpt_dir / ABANDONED / path.name)
        os.replace(path, moved[-1])
    return moved


def _step_of(path: Path) -> int:
    return int(path.name[len("step-") : len("step-") + 8])


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


def export_model(
    model: DualEncoder,
    out_dir: Path,
    provenance: dict[str, Any],
    tokenizer_folder: Path | None = None,
) -> Path:
    """Write the inference artifact (see common/artifact.py) for the trained model, with the
    files of its Hugging Face tokenizer from `tokenizer_folder` (None: open_clip's own)."""
    copier = tokenizer_copier(tokenizer_folder) if tokenizer_folder is not None else None
    return write_artifact(model, out_dir, provenance=provenance, extra_files=copier)
