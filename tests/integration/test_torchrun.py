"""torchrun with two gloo processes on CPU: the loss goes down; a killed run resumes."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
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


def start_torchrun(log: Path, *train_args: str) -> subprocess.Popen:
    """torchrun in the background, its stderr to `log`."""
    with open(log, "w") as stderr:
        return subprocess.Popen(
            torchrun_command(2, *train_args),
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def signal_tree(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def running(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie, dead but not yet reaped, counts as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_preempted_and_killed_runs_resume_exactly_where_they_stopped(tmp_path, synth_dir):
    """SIGTERM: the run saves at the step it is on and stops; meanwhile a second run on its
    run_dir is refused. kill -9 of the torchrun agent: its ranks die with it. Each --resume
    continues so that every step's loss is the one the uninterrupted run logged (same batches,
    augmentations, optimizer state and RNG states, and loss.negatives=queue's key encoder and
    queue of keys from both ranks)."""
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
        "--set",
        "loss.negatives=queue",
        "--set",
        "loss.queue_size=200",
    ]
    reference = tmp_path / "reference"
    run_torchrun(2, *args, "--set", f"run_dir={reference}")
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    run_args = [*args, "--set", f"run_dir={run}"]

    # 1. preemption: SIGTERM to torchrun, which passes it on to the ranks
    proc = start_torchrun(tmp_path / "1.log", *run_args)
    try:
        wait_for(ckpt / "step-00000008.pt", proc, timeout_s=240)
        tree = process_tree(proc.pid)
        signal_tree(tree, signal.SIGSTOP)  # hold it mid-run while a second run tries
        second = subprocess.run(
            [sys.executable, "-m", "train", *run_args, "--resume"],
            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        signal_tree(tree, signal.SIGCONT)
        proc.wait(timeout=120)
    finally:
        kill_hard(proc)
    assert second.returncode == 2, second.stderr
    holder = re.search(r"is in use by another run \(pid (\d+) on host ", second.stderr)
    assert holder and int(holder.group(1)) in tree, second.stderr  # rank 0 of the first run
    stopped_at = max(train_losses(run))
    assert 8 <= stopped_at < 16
    stop_line = f"stopped by SIGTERM after step {stopped_at} of {steps}: checkpoint saved"
    assert stop_line in (tmp_path / "1.log").read_text()
    assert (ckpt / f"step-{stopped_at:08d}.pt").is_file()

    # 2. kill -9 of the agent alone, after the next checkpoint: no rank outlives it
    proc = start_torchrun(tmp_path / "2.log", *run_args, "--resume")
    try:
        wait_for(ckpt / "step-00000016.pt", proc, timeout_s=240)
        tree = process_tree(proc.pid)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while running(tree[1:]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(tree[1:]), "ranks outlived their torchrun agent"
    finally:
        signal_tree(tree, signal.SIGKILL)
    assert f"at step {stopped_at}" in (tmp_path / "2.log").read_text()

    # 3. to the end
    result = run_torchrun(2, *run_args, "--resume")
    assert f"steps 16 -> {steps}" in result.stderr
    expected, resumed = train_losses(reference), train_losses(run)  # the resumed run's win
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["train/queue_keys"] == 200  # full, as in the reference
    waits = [json.loads(line).get("train/data_wait_s") for line in lines]
    assert all(w is not None and w >= 0 for w in waits)  # every step's wait for input
