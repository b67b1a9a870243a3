"""Helpers for the service tests: a tiny model artifact, indices of synthetic images, readiness."""

from __future__ import annotations

import base64
import io
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image

from common.artifact import write_artifact
from common.model import build_model
from common.shards import RawSample, iter_shards
from serve.build_index import build_index
from train import synth


def make_shard(root: Path, samples: int, seed: int = 0) -> str:
    """One shard of `samples` 32x32 synthetic image–caption pairs; returns its path."""
    synth.generate(
        root, train_shards=1, samples_per_shard=samples, seed=seed, val_samples=1, image_size=32
    )
    return str(root / "train" / "shard-000000.tar")


def read_samples(shard: str) -> list[RawSample]:
    return list(iter_shards(shard, Counter()))


def make_artifact(root: Path) -> Path:
    """A randomly initialised duet-micro artifact (embed_dim 64)."""
    return write_artifact(build_model("duet-micro"), root / "artifact", provenance={})


def make_index(artifact: Path, shard: str, out: Path) -> Path:
    build_index(artifact, shard, out, batch_size=16)
    return out


def wait_until_loaded(client: TestClient, timeout_s: float = 60.0) -> Any:
    """/ready once loading has finished, either way (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/ready")
        if "still loading" not in response.text or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def png(size: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_envelope(response: Any, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "type"}
    assert body["type"] == type_
    assert isinstance(body["error"], str) and body["error"]
    return body
