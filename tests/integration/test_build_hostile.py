"""An index build over a folder of hostile and broken files holds the service's per-image bounds:
each bad file is skipped and counted by kind, none is decoded, and peak memory stays bounded, in
the build's process and in a worker process preparing its images; both give the same index."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from serve.indexing.index import SearchIndex
from tests.conftest import REPO_ROOT, subprocess_env
from tests.serve_support import make_artifact

MAX_UPLOAD_BYTES = 200_000  # DUET_MAX_UPLOAD_BYTES for the build: the service's setting
# Peak RSS the build may add over the process after its imports (model, batches, index). A
# decode of `huge.png` alone is 400 MB, of `thin.png` resized for the model some GB.
MAX_BUILD_RSS_BYTES = 250 * 1024 * 1024

BUILD = """
import json, resource, sys
from serve.indexing.build import build_index

def peak_bytes(who):
    return resource.getrusage(who).ru_maxrss * 1024

before = peak_bytes(resource.RUSAGE_SELF)
# in this process, then in a worker process (the build's default from the command line)
here = build_index(sys.argv[1], sys.argv[2], sys.argv[3] + "-here", batch_size=4, workers=0)
worker = build_index(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=4, workers=1)
print(json.dumps({
    "summaries": [here, worker],
    "added_rss_bytes": peak_bytes(resource.RUSAGE_SELF) - before,
    "worker_over_this_process_bytes": peak_bytes(resource.RUSAGE_CHILDREN) - before,
}))
"""


def png_of_zeros(width: int, height: int, mode_byte: int = 0) -> bytes:
    """A valid black PNG (grey when `mode_byte` is 0, RGB when 2) of any size in a few KB:
    its rows are zeros, which zlib squeezes ~1000:1. Pillow cannot make one without the pixels."""
    channels = 3 if mode_byte == 2 else 1
    raw = zlib.compress(bytes((width * channels + 1) * height), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def hostile_folder(root: Path) -> dict[str, int]:
    """Two good pictures among hostile and broken files; the kind each bad one is counted as."""
    root.mkdir()
    (root / "deep" / "er").mkdir(parents=True)
    for i, name in enumerate(["good.png", "deep/er/good.jpg"]):
        Image.new("RGB", (48, 32), (200, 40 * i, 10)).save(root / name)
    (root / "thin.png").write_bytes(png_of_zeros(1, 200_000, mode_byte=2))  # < 1 KB
    (root / "huge.png").write_bytes(png_of_zeros(10_000, 10_000))  # 100 M pixels, ~100 KB
    photo = io.BytesIO()
    Image.effect_noise((200, 200), 60).convert("RGB").save(photo, format="JPEG")
    (root / "truncated.jpg").write_bytes(photo.getvalue()[: len(photo.getvalue()) // 2])
    (root / "letter.jpg").write_text("Dear Sir, this is no picture.")  # a wrong extension
    Image.new("RGB", (16, 16)).save(root / "scan.tiff", format="TIFF")
    (root / "big.bmp").write_bytes(b"BM" + bytes(MAX_UPLOAD_BYTES))  # over the byte bound
    return {
        "image_too_thin": 1,
        "image_too_large": 1,
        "truncated_image": 1,
        "corrupt_image": 1,
        "unsupported_format": 1,
        "file_too_large": 1,
    }


def test_hostile_files_are_skipped_by_kind_undecoded_within_bounded_memory(tmp_path: Path):
    artifact = make_artifact(tmp_path)
    expected = hostile_folder(tmp_path / "photos")
    assert (tmp_path / "photos" / "thin.png").stat().st_size < 1024
    out = tmp_path / "index"
    env = subprocess_env(DUET_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES))
    result = subprocess.run(
        [sys.executable, "-c", BUILD, str(artifact), str(tmp_path / "photos"), str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # the worker imports what this process did, less the model: its peak is no higher
    assert report["added_rss_bytes"] < MAX_BUILD_RSS_BYTES, report
    assert report["worker_over_this_process_bytes"] < MAX_BUILD_RSS_BYTES, report
    for summary in report["summaries"]:
        assert summary["count"] == 2
        assert summary["skipped"] == expected
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["skipped"] == expected
    assert manifest["image_bounds"]["max_image_bytes"] == MAX_UPLOAD_BYTES
    assert manifest["image_bounds"]["max_image_pixels"] == 40_000_000  # the service's default
    here, worker = SearchIndex.load(Path(f"{out}-here")), SearchIndex.load(out)
    assert np.array_equal(here.vectors([0, 1]), worker.vectors([0, 1]))  # same bytes, same code
    assert here.rows([0, 1]) == worker.rows([0, 1])
    assert here.thumbnails and worker.thumbnails
    assert [here.thumbnails.get(i) for i in (0, 1)] == [worker.thumbnails.get(i) for i in (0, 1)]
    here.close()
    worker.close()
