"""How many CPUs this process may use: its affinity mask and its cgroup's CPU quota.

torch and ONNX Runtime size their thread pools by the machine's cores; in a container limited to
2 CPUs (`docker run --cpus 2`, a Kubernetes limit) on a 64-core host that is 64 threads taking
turns on 2 CPUs' worth of time, each operator waiting for its slowest slice.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on (affinity), capped by its cgroup's quota; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cpus or 1, math.ceil(quota) if quota is not None else cpus or 1))


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time per period the cgroup allows (cgroup v2 `cpu.max`, v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), or None when unlimited or unknown."""
    try:
        v2 = cgroup_root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = cgroup_root / "cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
