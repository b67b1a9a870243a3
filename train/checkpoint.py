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

`Checkpointer` is the run's side of it: it saves and restores the model, optimizer, scheduler and
loss scale of a (distributed) run, and hands back what belongs to others (the data stream's
position, the negatives' state) as a `Restored` value.
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.artifact import write_artifact
from common.config import to_dict
from common.hf_text import tokenizer_copier
from common.model import DualEncoder
from train.compute import Precision
from train.config import TrainConfig
from train.distributed import DistInfo, full_state_dicts, is_sharded, load_full_state_dicts
from train.resume import (
    apply_optimizer_changes,
    check_changes,
    config_changes,
    needs_optimizer_changes,
)
from train.stability import model_is_finite

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


@dataclass(slots=True)
class Restored:
    """What a restored checkpoint holds for the rest of the run besides the model's state."""

    step: int
    path: Path
    data_epoch: int
    """Where this rank's data stream starts when `data_state` is None."""
    data_state: dict[str, Any] | None
    """This rank's stream position; None when the checkpoint was saved by another number of
    ranks (positions do not map onto these ranks: the stream restarts at `data_epoch`)."""
    negatives: dict[str, Any] | None
    """The loss.negatives state (`Negatives.load_state_dict`), once the data's size is known."""
    skipped: Counter[str] = field(default_factory=Counter)
    """This rank's skip counts (rank 0 gets every rank's when the rank count changed)."""


class Checkpointer:
    """Saves and restores one run's resumable state in RUN_DIR/checkpoints (every rank calls
    save and restore: with FSDP they are collectives)."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: DistInfo,
        model: DualEncoder,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        precision: Precision,
    ) -> None:
        self.cfg, self.info = cfg, info
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.precision = precision
        self.ckpt_dir = Path(cfg.run_dir) / "checkpoints"
        self.saved_step = -1  # the step whose state is on disk (restored or last saved)
        self.saved_path: Path | None = None  # and its file
        self.last_good_kept = False  # whether this run's first non-finite step came yet

    def save(self, step: int, rank_state: dict[str, Any], shared: dict[str, Any]) -> Path | None:
        """Rank 0 writes the checkpoint of `step`; the others wait so none runs ahead of a save.

        rank_state: what differs between ranks (gathered to rank 0 as "ranks"); shared: the
        rest of the run's state besides model, optimizer, scheduler and loss scale (e.g. the
        negatives' state, itself gathered by a collective before this call).
        """
        if not model_is_finite(self.model, self.info):  # every rank takes part, and agrees
            raise FloatingPointError(
                f"the model has non-finite parameters at step {step}: not checkpointing it"
            )
        ranks = self._gather_to_main(rank_state)
        # FSDP gathers the whole weights to rank 0 in a collective: every rank takes part
        state: dict[str, Any] = {}
        if self.info.is_main or is_sharded(self.model):
            model_state, optimizer_state = full_state_dicts(self.model, self.optimizer)
            state = {
                **shared,
                "step": step,
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "config": to_dict(self.cfg),
                "ranks": ranks,
                "scaler": self.precision.state_dict(),  # fp16's loss scale; empty otherwise
            }
        if self.info.is_main and step != self.saved_step:  # e.g. resumed at the end
            self.saved_path = save_checkpoint(
                self.ckpt_dir, step, state, self.cfg.checkpoint.keep_last
            )
            log.info("saved checkpoint %s", self.saved_path)
        self.saved_step = step
        self._barrier()
        return self.saved_path

    def restore(self, path: Path | None) -> Restored | None:
        """Load the checkpoint at `path` (None: the newest readable one; none there: None)."""
        if path is None:
            found = load_latest(self.ckpt_dir)
            if found is None:
                log.info("no checkpoint in %s: starting from step 0", self.ckpt_dir)
                return None
            state, path = found
        else:
            state = load_checkpoint(path)
        changes = config_changes(state["config"], self.cfg)
        check_changes(changes, path)  # refuses what the restored state would undo
        load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if needs_optimizer_changes(changes):
            apply_optimizer_changes(self.optimizer, self.scheduler, state["config"], self.cfg)
        self.precision.load_state_dict(state.get("scaler") or {})
        step = self.saved_step = int(state["step"])
        self.saved_path = path
        self._barrier()  # every rank has read the checkpoints before any is moved
        if self.info.is_main:
            for moved in set_aside_newer(self.ckpt_dir, step):
                log.warning("newer than the resumed checkpoint: moved to %s", moved)
        restored = self._rank_part(state, path)
        log.info("resumed from %s at step %d", path, step)
        return restored

    def _rank_part(self, state: dict[str, Any], path: Path) -> Restored:
        """This rank's RNGs set back, and the rest of `state` as `Restored`."""
        restored = Restored(
            int(state["step"]), path, int(state["data_epoch"]), None, state.get("negatives")
        )
        ranks = state.get("ranks") or []
        if len(ranks) == self.info.world_size:
            mine = ranks[self.info.rank]
            set_rng_state(mine["rng"], self.info.device)
            restored.data_state = mine["data"]  # the stream resumes exactly where it stopped
            restored.skipped = Counter(mine["skipped"])
            return restored
        # Saved by another number of ranks: positions and RNG streams do not map onto these
        # ranks, so the data restarts at the next epoch and rank 0 keeps the counts.
        log.warning(
            "%s was saved by %d ranks, this run has %d: the data stream restarts at epoch %d "
            "and the RNGs are not restored",
            path,
            len(ranks),
            self.info.world_size,
            restored.data_epoch + 1,
        )
        restored.data_epoch += 1
        if self.info.is_main:
            restored.skipped = sum((Counter(r["skipped"]) for r in ranks), Counter[str]())
        return restored

    def keep_last_good(self, failing_step: int) -> None:
        """At the run's first non-finite step, protect the newest checkpoint from rotation: the
        ones written while the run goes on may hold weights already on their way to blowing up."""
        if self.last_good_kept:
            return
        self.last_good_kept = True
        if self.saved_path is None or not self.info.is_main:
            return
        kept = keep_as_last_good(self.ckpt_dir, self.saved_path)
        log.warning(
            "step %d is non-finite: %s (step %d) kept as %s; to go back to it, resume with "
            "--resume %s (e.g. with a lower optim.lr)",
            failing_step,
            self.saved_path.name,
            self.saved_step,
            kept,
            kept,
        )

    def _gather_to_main(self, obj: Any) -> list[Any]:
        """[rank 0's obj, rank 1's, ...] on rank 0 (other ranks get an empty list)."""
        if not self.info.enabled:
            return [obj]
        out: list[Any] = [None] * self.info.world_size if self.info.is_main else []
        dist.gather_object(obj, out if self.info.is_main else None, dst=0)
        return out

    def _barrier(self) -> None:
        if self.info.enabled:
            dist.barrier()
