"""Fixtures shared by the suite: a small synthetic dataset, written once per session."""

from pathlib import Path

import pytest

from train.synth import generate


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train shards x 250 samples and 500 held-out samples of the built-in synthetic data."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, train_shards=8, samples_per_shard=250, seed=0, val_samples=500)
    return out


REPO_ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for child Python processes: this interpreter's packages and the repo."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def torchrun_command(nproc: int, *train_args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N -m train ARGS`, with this interpreter."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "train",
        *train_args,
    ]


def data_overrides(synth: Path) -> list[str]:
    """--set arguments pointing a recipe at the session's synthetic dataset."""
    return [
        "--set",
        f"data.train_shards={synth}/train/shard-{{000000..000007}}.tar",
        "--set",
        f"data.val_shards={synth}/val/shard-{{000000..000001}}.tar",
        "--set",
        f"data.zeroshot_file={synth}/zeroshot.json",
    ]


def run_torchrun(nproc: int, *train_args: str, timeout_s: float = 600):
    """Run `torchrun ... -m train ARGS` to completion; fail the test with its stderr if it fails."""
    import subprocess

    result = subprocess.run(
        torchrun_command(nproc, *train_args),
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
