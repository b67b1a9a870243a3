"""An index build over a folder of hostile and broken files holds the service's per-image bounds:
each bad file is skipped and counted by kind, none is decoded, and peak memory stays bounded."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from PIL import Image

from tests.conftest import REPO_ROOT, subprocess_env
from tests.serve_support import make_artifact

MAX_UPLOAD_BYTES = 200_000  # DUET_MAX_UPLOAD_BYTES for the build: the service's setting
# Peak RSS the build may add over the process after its imports (model, batches, index). A
# decode of `huge.png` alone is 400 MB, of `thin.png` resized for the model some GB.
MAX_BUILD_RSS_BYTES = 250 * 1024 * 1024

BUILD = """
import json, resource, sys
from serve.indexing.build import build_index

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = build_index(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=4)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"summary": summary, "added_rss_bytes": (after - before) * 1024}))
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
    assert report["added_rss_bytes"] < MAX_BUILD_RSS_BYTES, report
    assert report["summary"]["count"] == 2
    assert report["summary"]["skipped"] == expected
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["skipped"] == expected
    assert manifest["image_bounds"]["max_image_bytes"] == MAX_UPLOAD_BYTES
    assert manifest["image_bounds"]["max_image_pixels"] == 40_000_000  # the service's default
