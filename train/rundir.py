"""Who owns a run directory: one run at a time, and no silent reuse of an earlier run's state.

RUN_DIR/run.lock   an fcntl lock held by rank 0 for the life of the run; its text names the
                   holder (host, pid, start time). The kernel drops the lock when the process
                   dies, however it dies, so a lock left by a killed run is taken over at once.
RUN_DIR/logs/      rank-R.log: every rank's log records, tracebacks included (the console
                   shows one line per failure unless --debug).

A run directory that holds checkpoints belongs to the run that wrote them: a new run without
--resume is refused rather than mixing its checkpoints with theirs (keep-last would keep the old
run's higher-numbered files and delete the new run's). --overwrite deletes them first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO

import torch.distributed as dist

from train.distributed import DistInfo

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# What --overwrite deletes: every output of an earlier run (config.json is rewritten at start).
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "eval.jsonl",
    "eval.json",
    "tensorboard",
    "artifact",
    "logs",
)


class RunDirError(RuntimeError):
    """The run directory cannot be used by this run (in use, or holding another run's state)."""


class RunDirLock:
    """An exclusive lock on RUN_DIR/run.lock, released by `release` or by the process's death."""

    def __init__(self, path: Path, file: IO[str] | None) -> None:
        self.path, self._file = path, file

    def release(self) -> None:
        """Unlock and clear the holder's name (the file stays: removing it would race)."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.truncate(0)
        self._file.close()  # closing the descriptor drops the lock
        self._file = None


def _holder_text() -> str:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started})


def _describe(text: str) -> str:
    """'pid P on host H since T' from a lock file's text (or the raw text if it is not JSON)."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']} since {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return repr(text) if text else "a process that left no name"


def acquire_lock(run_dir: Path) -> RunDirLock:
    """Lock `run_dir` for this process, or raise RunDirError naming the run that holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    file = open(path, "a+")  # noqa: SIM115 - held open for the run: the descriptor is the lock
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = _describe(file.read().strip())
        file.close()
        raise RunDirError(
            f"run_dir {run_dir} is in use by another run ({holder}); wait for it to end, or "
            "choose another run_dir"
        ) from None
    except OSError as exc:  # a filesystem without locks (some NFS mounts): run unguarded
        log.warning("cannot lock %s (%s): nothing stops a second run on this run_dir", path, exc)
        file.close()
        return RunDirLock(path, None)
    file.seek(0)
    previous = file.read().strip()
    if previous:
        log.warning("taking over %s from %s, which no longer holds it", path, _describe(previous))
    file.seek(0)
    file.truncate(0)
    file.write(_holder_text() + "\n")
    file.flush()
    return RunDirLock(path, file)


def check_reuse(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh run on a run_dir with checkpoints; with `overwrite`, delete its outputs."""
    ckpt_dir = run_dir / "checkpoints"
    found = sorted(ckpt_dir.glob("step-*.pt")) if ckpt_dir.is_dir() else []
    if resume or not found:
        return
    if not overwrite:
        raise RunDirError(
            f"run_dir {run_dir} holds checkpoints of an earlier run (newest {found[-1].name}): "
            "add --resume to continue it, --overwrite to delete its outputs and start at step 0, "
            "or choose another run_dir"
        )
    for name in RUN_OUTPUTS:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    log.warning("--overwrite: deleted the outputs of the earlier run in %s", run_dir)


def log_to_file(run_dir: Path, rank: int) -> logging.Handler:
    """Send this rank's log records, with tracebacks, to RUN_DIR/logs/rank-R.log."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / f"rank-{rank}.log", delay=True)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    )
    logging.getLogger().addHandler(handler)
    return handler


def claim_run_dir(
    run_dir: Path, info: DistInfo, *, resume: bool, overwrite: bool
) -> tuple[RunDirLock | None, logging.Handler]:
    """Rank 0 locks run_dir and checks this run may use it; every rank learns the verdict
    (RunDirError on every rank if it is no). Returns rank 0's lock (None on the others) and the
    handler that from now on copies this rank's log to RUN_DIR/logs/rank-R.log."""
    lock, error = None, ""
    if info.is_main:
        try:
            lock = acquire_lock(run_dir)
            check_reuse(run_dir, resume=resume, overwrite=overwrite)
        except RunDirError as exc:
            error = str(exc)
    if info.enabled:
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        if lock is not None:
            lock.release()
        raise RunDirError(error)
    return lock, log_to_file(run_dir, info.rank)
