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


def test_killed_run_resumes_from_its_latest_checkpoint(tmp_path, synth_dir):
    run = tmp_path / "run"
    args = [
        "--recipe",
        "smoke",
        "--set",
        f"run_dir={run}",
        "--set",
        "checkpoint.every_steps=10",
        "--set",
        "data.val_shards=",
        *data_overrides(synth_dir)[:2],
    ]
    proc = subprocess.Popen(
        torchrun_command(2, *args, "--set", "steps=1000"),
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(run / "checkpoints" / "step-00000020.pt", proc, timeout_s=240)
    finally:
        kill_hard(proc)
    killed_at = max(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.pt"))
    assert 20 <= killed_at < 1000

    result = run_torchrun(2, *args, "--set", f"steps={killed_at + 20}", "--resume")
    assert f"at step {killed_at}" in result.stderr
    assert f"steps {killed_at} -> {killed_at + 20}" in result.stderr
    assert (run / "checkpoints" / f"step-{killed_at + 20:08d}.pt").is_file()
    losses = train_losses(run)
    resumed = [s for s in losses if s > killed_at]
    assert min(resumed) == (killed_at // 5 + 1) * 5  # logging picks up where the run stopped
    # a resumed model is a trained model: its loss is far below the fresh model's first loss
    assert losses[max(resumed)] < losses[5] - 0.3
