"""torchrun with two gloo processes on CPU: the loss goes down; a killed run resumes."""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    REPO_ROOT,
    data_overrides,
    run_torchrun,
    subprocess_env,
    torchrun_command,
)

pytestmark = pytest.mark.slow


def train_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            losses[record["step"]] = record["train/loss"]
    return losses


def test_two_processes_train_and_the_loss_goes_down(tmp_path, synth_dir):
    run = tmp_path / "run"
    result = run_torchrun(
        2,
        "--recipe",
        "smoke",
        "--set",
        f"run_dir={run}",
        "--set",
        "steps=60",
        *data_overrides(synth_dir),
    )
    assert "world size 2, global batch 64 (32 per rank)" in result.stderr
    losses = train_losses(run)
    first, last = losses[5], losses[60]
    assert last < first - 0.3, losses
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["samples"] == 500 and evaluation["step"] == 60
    assert (run / "artifact" / "duet_artifact.json").is_file()
    assert (run / "checkpoints" / "step-00000060.pt").is_file()
    assert list((run / "tensorboard").iterdir()), "TensorBoard events were written"


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker at once, as a crash or an OOM kill would."""
    for pid in process_tree(proc.pid):
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, "training ended before the checkpoint appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout_s}s"
        time.sleep(0.2)


def test_a_killed_run_resumes_exactly_where_it_stopped(tmp_path, synth_dir):
    """kill -9 mid-epoch after a checkpoint, --resume: every later step's loss is the one the
    uninterrupted run logged (same batches, augmentations, optimizer state and RNG states)."""
    # 4 shards of 250: each of a rank's 2 workers reads 1 shard, 7 batches of 32: 14 per epoch
    steps = 24
    args = [
        "--recipe",
        "smoke",
        "--set",
        f"steps={steps}",
        "--set",
        "checkpoint.every_steps=8",
        "--set",
        "logging.every_steps=1",
        "--set",
        "data.workers=2",
        "--set",
        "data.val_shards=",
        "--set",
        f"data.train_shards={synth_dir}/train/shard-{{000000..000003}}.tar",
    ]
    reference = tmp_path / "reference"
    run_torchrun(2, *args, "--set", f"run_dir={reference}")

    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun_command(2, *args, "--set", f"run_dir={run}"),
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(run / "checkpoints" / "step-00000008.pt", proc, timeout_s=240)
    finally:
        kill_hard(proc)
    killed_at = max(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.pt"))
    assert 8 <= killed_at < steps

    result = run_torchrun(2, *args, "--set", f"run_dir={run}", "--resume")
    assert f"at step {killed_at}" in result.stderr
    assert f"steps {killed_at} -> {steps}" in result.stderr
    expected, resumed = train_losses(reference), train_losses(run)  # the resumed run's win
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step
