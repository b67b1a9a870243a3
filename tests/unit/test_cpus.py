"""The CPUs a process may use: its affinity, capped by its cgroup's quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.cpus import available_cpus, cgroup_cpu_quota


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2: --cpus 1.5
        ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files: unknown
    ],
)
def test_cgroup_quota_in_cpus(tmp_path: Path, files: dict[str, str], quota: float | None):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if quota is None else max(1, min(affinity, -(-quota // 1)))
    assert available_cpus(tmp_path) == expected


def test_a_quota_below_the_cores_caps_them(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # one CPU's worth
    assert available_cpus(tmp_path) == 1
