"""The serve image for real: build it, run it on 127.0.0.1 with a tiny model and index, query it.

Needs a Docker engine: `make test-docker` (docs/operations.md). From the environment:
  DUET_DOCKER            the docker CLI (default: docker)
  DUET_DOCKER_BASE       the PYTHON_IMAGE build argument (default: the Dockerfile's own)
  DUET_DOCKER_CA_BUNDLE  a CA bundle for pip in the build (TLS interception), copied to the
                         git-ignored docker/ca-bundle.crt for the build unless that file exists
The container and the image are removed afterwards, also when a step fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from common.artifact import write_artifact
from common.model import build_model
from serve.indexing.build import build_index
from tests.conftest import REPO_ROOT, free_port
from train import synth

SAMPLES = 64
BUILD_TIMEOUT_S = 3600  # a cold build downloads torch and its CUDA wheels (~3 GB)
READY_TIMEOUT_S = 240
# the first test also builds the image and starts the container (the module's fixtures): the
# suite's per-test timeout (pyproject.toml) is too short for that
pytestmark = [pytest.mark.docker, pytest.mark.timeout(BUILD_TIMEOUT_S + READY_TIMEOUT_S + 300)]
CONTAINER_PORT = 9000  # not the image's 8000: proves UVICORN_PORT and the health check follow env
WORKERS = 2
LABELS = ["red circle", "blue square", "green star"]


def docker(*args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [os.environ.get("DUET_DOCKER", "docker"), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module", autouse=True)
def engine() -> None:
    try:
        result = docker("info", "--format", "{{.ServerVersion}}", check=False)
    except FileNotFoundError:
        pytest.fail("no docker CLI: install Docker (docs/operations.md)")
    if result.returncode != 0:
        pytest.fail(f"no Docker engine answers (start one: docker/dockerd.sh): {result.stderr}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random duet-micro artifact and a FAISS index of 64 synthetic images, readable by all."""
    root = tmp_path_factory.mktemp("docker-serve")
    synth.generate(
        root / "synth", train_shards=1, samples_per_shard=SAMPLES, seed=0, val_samples=SAMPLES
    )
    write_artifact(build_model("duet-micro"), root / "artifact", provenance={})
    build_index(root / "artifact", f"{root}/synth/val/shard-000000.tar", root / "index")
    # The image runs as uid 10001; pytest's temporary directories are private (0700).
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@contextmanager
def ca_bundle_in_context() -> Iterator[None]:
    source = os.environ.get("DUET_DOCKER_CA_BUNDLE")
    target = REPO_ROOT / "docker" / "ca-bundle.crt"
    if not source or target.exists():  # none asked for, or the checkout has its own
        yield
        return
    shutil.copyfile(source, target)
    try:
        yield
    finally:
        target.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The serve image, built from this checkout under a unique tag; removed afterwards."""
    tag = f"duet-serve-test:{uuid.uuid4().hex[:12]}"
    command = ["build", "--force-rm", "--file", "docker/serve.Dockerfile", "--tag", tag]
    if base := os.environ.get("DUET_DOCKER_BASE"):
        command += ["--build-arg", f"PYTHON_IMAGE={base}"]
    try:
        with ca_bundle_in_context():
            start = time.monotonic()
            result = docker(*command, str(REPO_ROOT), timeout_s=BUILD_TIMEOUT_S, check=False)
        assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
        size = docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
        print(f"built {tag} in {time.monotonic() - start:.0f} s, {int(size) / 1e9:.2f} GB")
        yield tag
    finally:
        docker("image", "rm", "--force", tag, check=False)


@pytest.fixture(scope="module")
def container(image: str, model_dir: Path) -> Iterator[str]:
    """The image running with the model and index mounted read-only; removed afterwards."""
    name = f"duet-serve-test-{uuid.uuid4().hex[:12]}"
    try:
        docker(
            "run",
            "--detach",
            "--name",
            name,
            "--publish",
            f"127.0.0.1:{free_port()}:{CONTAINER_PORT}",  # loopback only
            "--env",
            f"UVICORN_PORT={CONTAINER_PORT}",
            "--env",
            f"UVICORN_WORKERS={WORKERS}",
            "--volume",
            f"{model_dir / 'artifact'}:/data/artifact:ro",
            "--volume",
            f"{model_dir / 'index'}:/data/index:ro",
            image,
        )
        wait_until_healthy(name)
        yield name
    finally:
        docker("rm", "--force", "--volumes", name, check=False)


def wait_until_healthy(name: str) -> None:
    """Until Docker's own HEALTHCHECK (the image's) reports healthy; fail early if it cannot."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
        health = state.get("Health", {}).get("Status")
        if health == "healthy":
            return
        if state["Status"] != "running" or health == "unhealthy":
            break
        time.sleep(1)
    logs = docker("logs", "--tail", "60", name, check=False)
    pytest.fail(f"container not healthy ({state}):\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}")


@pytest.fixture(scope="module")
def client(container: str) -> Iterator[httpx.Client]:
    port = docker("port", container, f"{CONTAINER_PORT}/tcp").stdout.split()[0].rsplit(":", 1)[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as client:
        # Each worker loads its own model: ask until several answers in a row say ready.
        ready_in_a_row = 0
        for _ in range(100):
            ready_in_a_row = ready_in_a_row + 1 if client.get("/ready").status_code == 200 else 0
            if ready_in_a_row == 10:
                break
            time.sleep(0.2)
        yield client


def first_image(model_dir: Path) -> bytes:
    with tarfile.open(model_dir / "synth" / "val" / "shard-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        return tar.extractfile(member).read()


def test_health_and_ready(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    response = client.get("/ready")
    assert response.status_code == 200, response.text
    ready = response.json()
    # the default runtime cannot export ONNX towers into an artifact mounted read-only: torch
    # serves, and /ready says how to get ONNX Runtime
    assert "export them beforehand" in ready.pop("runtime_fallback")
    assert ready == {
        "status": "ready",
        "model": "duet-micro",
        "index_count": SAMPLES,
        "indices": {"default": SAMPLES},
        "runtime": "torch",
    }


def test_text_search(client: httpx.Client) -> None:
    response = client.post("/search", json={"text": "a red circle", "k": 5})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 5
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(r["key"] and r["metadata"]["classname"] for r in results)


def test_image_search_finds_the_indexed_image(client: httpx.Client, model_dir: Path) -> None:
    files = {"image": ("q.jpg", first_image(model_dir), "image/jpeg")}
    response = client.post("/search", files=files, data={"k": "3"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3 and results[0]["score"] > 0.99  # the image itself is in the index


def test_classify(client: httpx.Client, model_dir: Path) -> None:
    files = {"image": ("x.jpg", first_image(model_dir), "image/jpeg")}
    response = client.post("/classify", files=files, data={"labels": LABELS})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert sorted(p["label"] for p in predictions) == sorted(LABELS)
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-3)


def test_bad_upload_gets_the_json_error_envelope(client: httpx.Client) -> None:
    files = {"image": ("x.jpg", b"this is not an image", "image/jpeg")}
    response = client.post("/classify", files=files, data={"labels": LABELS})
    assert response.status_code == 415
    assert set(response.json()) == {"error", "type"}


def test_runs_as_non_root_with_workers_from_env_and_no_compilers(container: str) -> None:
    assert docker("exec", container, "id", "-u").stdout.strip() == "10001"
    processes = docker("top", container, "-o", "pid,args").stdout
    # uvicorn's supervisor plus WORKERS spawned worker processes
    assert processes.count("multiprocessing") >= WORKERS, processes
    found = docker(
        "exec", container, "sh", "-c", "command -v gcc cc c++ g++ clang make || true"
    ).stdout
    assert found.strip() == "", found
