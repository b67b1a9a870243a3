"""Stop signals: recorded, not fatal, in the rank; data workers outlive one from outside."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from train.data import _init_worker
from train.preemption import StopSignals, exit_code


def test_stop_signals_are_recorded_and_the_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals()
    stop.install()
    try:
        assert stop.requested(torch.device("cpu"), distributed=False) == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's early warning
        assert stop.requested(torch.device("cpu"), distributed=False) == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(torch.device("cpu"), distributed=False) == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before
    assert exit_code(signal.SIGTERM) == 143


class WorkerPids(IterableDataset):
    """Endless: the worker's pid, again and again."""

    def __iter__(self) -> Iterator[int]:
        while True:
            time.sleep(0.01)
            yield os.getpid()


def test_a_data_worker_outlives_a_stop_signal_from_anyone_but_its_rank():
    loader = DataLoader(
        WorkerPids(),
        batch_size=None,
        num_workers=1,
        worker_init_fn=functools.partial(_init_worker, 0),
    )
    batches = iter(loader)
    worker = next(batches)
    for sig in ("USR1", "TERM"):  # as SLURM or torchrun would send them: from another process
        subprocess.run(["kill", f"-{sig}", str(worker)], check=True)
    time.sleep(0.5)
    assert [next(batches) for _ in range(5)] == [worker] * 5  # still serving
    del batches  # the DataLoader ends its worker: SIGTERM from the rank, which it obeys at once
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
