"""Helpers for the service tests: a tiny model artifact, indices of synthetic images, readiness."""

from __future__ import annotations

import base64
import contextlib
import io
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image

from common.artifact import write_artifact
from common.model import build_model
from common.shards import RawSample, iter_shards
from serve.indexing.build import build_index
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


def assert_openai_envelope(
    response: Any, status: int, code: str, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's envelope, as the /v1 routes answer errors; returns its `error` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert isinstance(error["message"], str) and error["message"]
    return error


def black_png(width: int, height: int, color_type: int = 0) -> bytes:
    """A valid black PNG of any size, built row by row: never the whole image in memory.

    color_type 0 is 8-bit grayscale, 2 is 8-bit RGB. Zeros compress ~1000:1, so a
    6000 x 6000 image is a few KB that decodes to ~100 MB: what a decompression attack sends.
    """
    channels = {0: 1, 2: 3}[color_type]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + width * channels)  # filter byte + pixels
    rows_per_piece = max(1, (1 << 24) // len(row))
    pieces = [
        compressor.compress(row * min(rows_per_piece, height - start))
        for start in range(0, height, rows_per_piece)
    ]
    pixels = b"".join(pieces) + compressor.flush()
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, b"a test's lock holder", 0)
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def write_lock_held(index: Path) -> Iterator[None]:
    """Another process holds index `index`'s write lock (`.NAME.lock` beside it, as
    serve.indexing takes it) until the block ends: a service started meanwhile serves it
    read-only."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(index.parent / f".{index.name}.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


def assert_same_hits(a: Any, b: Any, queries: Any, k: int = 10) -> None:
    """Two loaded indices (SearchIndex) answer `queries` with the same ids, scores and keys."""
    hits_a, hits_b = a.search(queries, k), b.search(queries, k)
    assert [[(h.id, h.score, h.key) for h in q] for q in hits_a] == [
        [(h.id, h.score, h.key) for h in q] for q in hits_b
    ]
