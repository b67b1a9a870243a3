"""Replacing an index: a build killed at any moment leaves the old or the new index, never none;
the next build removes what killed builds left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from serve.indexing.index import SearchIndex, write_index
from tests.conftest import REPO_ROOT, subprocess_env

DIM = 8


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def rows(count: int) -> list[tuple[str, str, dict]]:
    return [(f"k{i}", f"caption {i}", {}) for i in range(count)]


# A child that rewrites the index with 80 rows, again and again, until it is killed.
REBUILD_FOREVER = f"""
import sys
import numpy as np
from serve.indexing.index import write_index
vectors = np.eye(80, {DIM}, dtype=np.float32)
vectors[{DIM}:, 0] = 1.0
print("ready", flush=True)
while True:
    write_index(sys.argv[1], vectors, [(f"k{{i}}", "c", {{}}) for i in range(80)])
"""


def loadable_count(out: Path) -> int:
    index = SearchIndex.load(out)
    try:
        return index.count
    finally:
        index.close()


def test_a_build_killed_at_any_moment_leaves_a_loadable_index(tmp_path: Path):
    """One child rewrites the index in a loop. Frozen (SIGSTOP) at several moments, the files
    are as a kill at that moment would leave them: the old index (50) or a new one (80) loads.
    Then it is killed, and the next build cleans up what it left."""
    out = tmp_path / "index"
    write_index(out, unit_vectors(50, seed=0), rows(50))
    child = subprocess.Popen(
        [sys.executable, "-c", REBUILD_FOREVER, str(out)],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for delay_s in (0.01, 0.05, 0.13, 0.29, 0.41):
            time.sleep(delay_s)
            child.send_signal(signal.SIGSTOP)
            assert loadable_count(out) in (50, 80)
            child.send_signal(signal.SIGCONT)
        for _ in range(500):  # kill it inside a build: while its temporary directory exists
            child.send_signal(signal.SIGSTOP)
            if list(tmp_path.glob(".index.build-*")):
                break
            child.send_signal(signal.SIGCONT)
            time.sleep(0.003)
    finally:
        child.kill()
        child.wait()
    assert loadable_count(out) in (50, 80)
    assert list(tmp_path.glob(".index.*")), "the kill did not land inside a build"

    running = tmp_path / f".index.build-{socket.gethostname().replace('-', '_')}-{os.getpid()}-live"
    running.mkdir()  # a build of a live process (this one): not to be touched
    write_index(out, unit_vectors(30, seed=1), rows(30))
    left = sorted(p.name for p in tmp_path.glob(".index.*"))
    assert left == sorted([running.name, ".index.lock"])  # the lock: who writes the index
    assert SearchIndex.load(out).count == 30
