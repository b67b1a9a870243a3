"""A killed index build (SIGKILL, one process; SIGTERM, torchrun) continues with --resume from the
parts it finished, and its index equals an uninterrupted build's: ids, keys, vectors, thumbnails.

The last input is a shard behind a `pipe:` command that waits for a file: the build finishes
every other part, then waits there, and is killed while it waits (a slow remote shard)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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

SHARDS = 8  # x 24 pictures, + a folder of 8: 200 images in 9 parts, the gated shard last
PER_SHARD = 24
BATCH = 16  # batches would cross parts (24 a shard): a chunk must not


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, Path, dict]]:
    """The artifact, the `--data` (the last shard gated), the gate, and the uninterrupted build's
    index (the gate open); the gate is opened at the end whatever happens, so no waiting shell
    is left behind."""
    root = tmp_path_factory.mktemp("resume")
    artifact = make_artifact(root)
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
    gate = root / "go"
    gated = f"pipe:while [ ! -e {gate} ]; do sleep 0.05; done; cat {shards[-1]}"
    data = "::".join([*shards[:-1], str(folder), gated])
    gate.touch()
    reference = build_index(artifact, data, root / "reference", batch_size=BATCH)
    gate.unlink()
    try:
        yield artifact, data, gate, {"summary": reference, "dir": root / "reference"}
    finally:
        gate.touch()


def killed_build(command: list[str], staging: Path, parts_before_gate: int, sig: int) -> None:
    """Run `command`, wait until every part before the gated one has its chunk, send `sig`."""
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while not staging.is_dir() or len(finished(staging)) < parts_before_gate:
            assert process.poll() is None, process.stderr.read()[-3000:] if process.stderr else ""
            assert time.monotonic() < deadline, "the build never reached the gated shard"
            time.sleep(0.05)
        process.send_signal(sig)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_same_index(resumed: Path, reference: Path, *, exact: bool) -> None:
    a, b = SearchIndex.load(resumed), SearchIndex.load(reference)
    try:
        ids = list(range(b.count))
        assert a.count == b.count == 200
        assert a.rows(ids) == b.rows(ids)  # keys, captions, metadata, id for id
        if exact:
            assert np.array_equal(a.vectors(ids), b.vectors(ids))  # bit for bit
        else:  # torchrun's workers run one thread each: sums in another order
            np.testing.assert_allclose(a.vectors(ids), b.vectors(ids), rtol=0, atol=1e-6)
        assert a.thumbnails is not None and b.thumbnails is not None
        assert [a.thumbnails.get(i) for i in ids] == [b.thumbnails.get(i) for i in ids]
        assert a.manifest["skipped"] == b.manifest["skipped"]
    finally:
        a.close()
        b.close()


def resume_in_process(artifact: Path, data: str, out: Path, caplog, capsys) -> None:
    """Refused without --resume; with it, only the gated part is embedded."""
    argv = ["--model", str(artifact), "--data", data, "--out", str(out), "--batch-size", str(BATCH)]
    assert build_cli.main(argv) == 2
    assert "partial build (8 of 9 parts embedded): pass --resume" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="serve.indexing.build"):
        assert build_cli.main([*argv, "--resume"]) == 0
    assert "resuming: 8 of 9 parts were embedded before" in caplog.text
    assert "indexed 200 images" in capsys.readouterr().out
    assert not Path(f"{out}.parts").exists()


def test_a_build_killed_with_sigkill_resumes_to_the_uninterrupted_index(
    inputs, tmp_path: Path, caplog, capsys
) -> None:
    artifact, data, gate, reference = inputs
    out = tmp_path / "index"
    argv = ["--model", str(artifact), "--data", data, "--out", str(out), "--batch-size", str(BATCH)]
    command = [sys.executable, "-m", "serve.build_index", *argv]
    killed_build(command, Path(f"{out}.parts"), 8, signal.SIGKILL)
    assert not out.exists()
    gate.touch()
    try:
        resume_in_process(artifact, data, out, caplog, capsys)
    finally:
        gate.unlink()
    assert_same_index(out, reference["dir"], exact=True)


def test_a_torchrun_build_stopped_with_sigterm_resumes_in_one_process(
    inputs, tmp_path: Path, caplog, capsys
) -> None:
    artifact, data, gate, reference = inputs
    out = tmp_path / "index"
    argv = ["--model", str(artifact), "--data", data, "--out", str(out), "--batch-size", str(BATCH)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    killed_build(
        [*torchrun, "-m", "serve.build_index", *argv], Path(f"{out}.parts"), 8, signal.SIGTERM
    )
    assert not out.exists()
    gate.touch()
    try:
        resume_in_process(artifact, data, out, caplog, capsys)
    finally:
        gate.unlink()
    assert_same_index(out, reference["dir"], exact=False)
