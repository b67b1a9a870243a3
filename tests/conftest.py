"""Fixtures shared by the suite: a small synthetic dataset, written once per session."""

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common.model import DualEncoder, build_model
from common.preprocess import tokenizer
from train.compute import prepare_model
from train.config import ComputeConfig
from train.synth import generate


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train shards x 250 samples and 500 held-out samples of the built-in synthetic data."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, train_shards=8, samples_per_shard=250, seed=0, val_samples=500)
    return out


REPO_ROOT = Path(__file__).resolve().parents[1]

# The service's default runtime (auto) exports each new artifact's ONNX towers at its first start,
# seconds per artifact: the suite's services run torch unless a test names a runtime (settings or
# child processes: both read DUET_RUNTIME). tests/unit/test_runtime.py covers auto.
os.environ.setdefault("DUET_RUNTIME", "torch")


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
    return run_command(torchrun_command(nproc, *train_args), timeout_s)


def run_module(*args: str, timeout_s: float = 600):
    """Run `python -m ARGS` to completion; fail the test with its stderr if it fails."""
    return run_command([sys.executable, "-m", *args], timeout_s)


def run_command(command: list[str], timeout_s: float):
    import subprocess

    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(
    artifact: Path, index: Path, timeout_s: float = 120, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`python -m serve` on 127.0.0.1:<free port> until /ready answers 200; its base URL.

    `env`: more DUET_* settings. Stopped when the block ends; if it exits before it is ready, the
    test fails with its stderr.
    """
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    settings = dict(env or {}, DUET_PORT=str(port))
    settings.setdefault("DUET_ARTIFACT_DIR", str(artifact))
    settings.setdefault("DUET_INDEX_DIR", str(index))
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve"], cwd=REPO_ROOT, env=subprocess_env(**settings),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=base, timeout=10, trust_env=False) as client:
            while True:
                assert proc.poll() is None, f"server exited: {proc.stderr.read()[-3000:]}"  # type: ignore[union-attr]
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not become ready")
                time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def micro_step_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed duet-micro batch for comparing training-step variants: images [6, 3, 32, 32] and
    tokens [6, L]."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g)
    return images, tokenizer("duet-micro")([f"a {c} shape" for c in "abcdef"])


def micro_models(*computes: ComputeConfig) -> list[DualEncoder]:
    """One duet-micro per compute config, all with the same initial weights, prepared on CPU."""
    models = []
    for compute in computes:
        torch.manual_seed(0)
        model = build_model("duet-micro")
        prepare_model(model, compute, torch.device("cpu"))
        models.append(model)
    return models
