"""A killed index build continues with --resume from the parts it finished, and its index equals an
uninterrupted build's: ids, keys, metadata, thumbnails, and vectors bit for bit.

A torchrun build of two processes, one of them killed with SIGKILL (torchrun then stops the other
with SIGTERM), resumed by one process. The last two inputs are shards behind `pipe:` commands
that wait for a file each (slow remote shards): the ranks finish every part before them, then
wait there, and are killed while they wait."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.indexing import build as build_cli
from serve.indexing.build import build_index
from serve.indexing.index import SearchIndex
from serve.indexing.staging import finished
from tests.conftest import REPO_ROOT, subprocess_env
from tests.serve_support import make_artifact
from train import synth

pytestmark = pytest.mark.slow

SHARDS = 8  # x 24 pictures, + a folder of 8: 200 images in 9 parts, two gated shards last
PER_SHARD = 24
BATCH = 16  # batches would cross parts (24 a shard): a chunk's must not


def gated_inputs(root: Path) -> tuple[str, list[Path]]:
    """`--data` for 7 shards, a folder and 2 gated shards (parts 7 and 8), and the 2 gates."""
    synth.generate(
        root / "synth",
        train_shards=SHARDS,
        samples_per_shard=PER_SHARD,
        seed=1,
        val_samples=1,
        image_size=32,
    )
    shards = sorted(str(p) for p in (root / "synth" / "train").glob("*.tar"))
    folder = root / "photos"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 30), (30 * i, 90, 200 - 20 * i)).save(folder / f"p{i}.png")
    gates = [root / "gate-a", root / "gate-b"]
    gated = [
        f"pipe:while [ ! -e {gate} ]; do sleep 0.05; done; cat {shard}"
        for gate, shard in zip(gates, shards[-2:], strict=True)
    ]
    return "::".join([*shards[:-2], str(folder), *gated]), gates


def killed_torchrun(command: list[str], staging: Path, parts_done: int) -> None:
    """Run `command` (torchrun), wait until `parts_done` parts have their chunk, SIGKILL one of
    its workers; torchrun stops the other with SIGTERM and fails."""
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while not staging.is_dir() or len(finished(staging)) < parts_done:
            assert process.poll() is None, process.stderr.read()[-3000:] if process.stderr else ""
            assert time.monotonic() < deadline, "the build never reached its gates"
            time.sleep(0.05)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 2, children  # the two ranks
        os.kill(int(children[0]), signal.SIGKILL)
        assert process.wait(timeout=60) != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_same_index(resumed: Path, reference: Path) -> None:
    a, b = SearchIndex.load(resumed), SearchIndex.load(reference)
    try:
        ids = list(range(b.count))
        assert a.count == b.count == 200
        assert a.rows(ids) == b.rows(ids)  # keys, captions, metadata, id for id
        assert np.array_equal(a.vectors(ids), b.vectors(ids))  # bit for bit
        assert a.thumbnails is not None and b.thumbnails is not None
        assert [a.thumbnails.get(i) for i in ids] == [b.thumbnails.get(i) for i in ids]
        assert a.manifest["skipped"] == b.manifest["skipped"]
    finally:
        a.close()
        b.close()


def test_a_killed_build_resumes_to_the_uninterrupted_index(tmp_path: Path, caplog, capsys) -> None:
    artifact = make_artifact(tmp_path)
    data, gates = gated_inputs(tmp_path)
    out, staging = tmp_path / "index", tmp_path / "index.parts"
    argv = ["--model", str(artifact), "--data", data, "--out", str(out), "--batch-size", str(BATCH)]
    argv += ["--workers", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    try:
        # rank 1 waits at part 7, rank 0 at part 8, once parts 0-6 are done
        killed_torchrun([*torchrun, "-m", "serve.build_index", *argv], staging, 7)
        assert not out.exists() and finished(staging) == list(range(7))
        for gate in gates:
            gate.touch()

        assert build_cli.main(argv) == 2
        assert "(7 of 9 parts embedded): pass --resume" in capsys.readouterr().err
        with caplog.at_level(logging.INFO, logger="serve.indexing.build"):
            assert build_cli.main([*argv, "--resume"]) == 0
        assert "resuming: 7 of 9 parts were embedded before" in caplog.text
        assert "indexed 200 images" in capsys.readouterr().out
        assert not staging.exists()
        build_index(artifact, data, tmp_path / "reference", batch_size=BATCH)
    finally:
        for gate in gates:  # no shell left waiting
            gate.touch()
    assert_same_index(out, tmp_path / "reference")
