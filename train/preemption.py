"""Scheduler signals (stop at the next step, save, exit) and ranks that die with their launcher.

SLURM preemption, a job's time limit and Kubernetes eviction send SIGTERM, then SIGKILL after a
grace period; SLURM can send SIGUSR1 ahead of time (`--signal=USR1@SECONDS`). The handler only
records the signal: the training loop finishes its current step, every rank agrees to stop (a
signal may reach some ranks only), the run saves a checkpoint at that step and exits with
128 + the signal's number (143 for SIGTERM), the status a process killed by that signal would
have, so a scheduler's retry and requeue rules see a preempted job as they always did.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StopSignals:
    """Records SIGTERM / SIGUSR1 instead of dying; `requested` says whether any rank got one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # only a flag: the loop acts on it between steps, where stopping is safe
        self.received = signum

    def requested(self, device: torch.device, distributed: bool) -> int:
        """The signal any rank received (0 if none), the same on every rank (a collective)."""
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        if distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by `signum` after saving: 128 + signum."""
    return 128 + signum


def die_with_launcher() -> None:
    """Under torchrun, have the kernel SIGKILL this rank when its agent dies.

    torchrun starts each rank in a session of its own, so a SIGKILL of the agent (an OOM kill, a
    node agent's kill) leaves the ranks running on their own, writing checkpoints. The agent is
    this process's parent; PR_SET_PDEATHSIG is Linux only (elsewhere nothing is set). Not for a
    plain `python -m train`, whose parent is a shell the run may outlive (nohup).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return
    if os.getppid() == 1:  # the agent died before the request took effect
        os._exit(exit_code(signal.SIGKILL))
