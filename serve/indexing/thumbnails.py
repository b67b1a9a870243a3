"""Thumbnails of indexed images: made at build time, packed in one file, one read per thumbnail.

An index directory with thumbnails holds

    thumbnails.bin            the encoded thumbnails back to back; thumbnail i belongs to row id i
    thumbnails.offsets.npy    int64 [N + 1]: thumbnail i is bytes offsets[i] : offsets[i + 1]
                              of thumbnails.bin (an empty range: that row has none)

and the manifest's `thumbnails` entry says their format and size. A packed file with an offset
table rather than one file per image (a million small files are slow to copy, list and delete,
and cost an inode and a block each) or SQLite BLOBs (a B-tree walk and a page copy per read,
and a metadata store that grows by the images' bytes): serving one thumbnail is one `os.pread`
at a known offset, and an index of N images adds exactly two files.

Thumbnails keep the aspect ratio with the longest side at most `max_side_px`, are never
enlarged, have the EXIF orientation applied (the picture stands as a camera's viewer shows it)
and are encoded as WebP (default; about half JPEG's bytes at the same quality) or JPEG.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

THUMBNAILS_FILE = "thumbnails.bin"
OFFSETS_FILE = "thumbnails.offsets.npy"
MEDIA_TYPES = {"webp": "image/webp", "jpeg": "image/jpeg"}
THUMBNAIL_FORMATS = ("webp", "jpeg", "none")
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True, kw_only=True)
class ThumbnailSpec:
    """How thumbnails are made at index build time."""

    format: str = "webp"
    """`webp`, `jpeg`, or `none` (no thumbnails)."""
    max_side_px: int = 256
    """Longest side of a thumbnail; smaller images keep their size."""
    quality: int = 80
    """Encoder quality, 1-100 (WebP and JPEG)."""

    def __post_init__(self) -> None:
        if self.format not in THUMBNAIL_FORMATS:
            raise ValueError(
                f"thumbnails: format must be one of {THUMBNAIL_FORMATS}, got {self.format!r}"
            )
        if not 16 <= self.max_side_px <= 4096:
            raise ValueError(
                f"thumbnails: max_side_px must be in [16, 4096], got {self.max_side_px}"
            )
        if not 1 <= self.quality <= 100:
            raise ValueError(f"thumbnails: quality must be in [1, 100], got {self.quality}")

    @property
    def enabled(self) -> bool:
        return self.format != "none"

    def manifest(self) -> dict[str, Any]:
        return {"format": self.format, "max_side_px": self.max_side_px, "quality": self.quality}


def make_thumbnail(image: Image.Image, spec: ThumbnailSpec) -> bytes:
    """`image` (decoded, RGB) shrunk to `spec.max_side_px`, upright by its EXIF, encoded."""
    width, height = image.size
    scale = min(1.0, spec.max_side_px / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Resize first, then turn: the transpose then works on the small image. resize keeps `info`
    # (where the EXIF is), so the small image still carries the orientation.
    small = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0) if scale < 1 else image
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        small = ImageOps.exif_transpose(small)
    out = io.BytesIO()
    if spec.format == "webp":
        # method 2: the bytes of libwebp's default (4) in ~45% of its time (bench/thumbnails.py)
        small.save(out, format="WEBP", quality=spec.quality, method=2)
    else:
        small.save(out, format="JPEG", quality=spec.quality, optimize=True)
    return out.getvalue()


def offsets_path(path: Path) -> Path:
    """`x/thumbnails.bin` -> `x/thumbnails.offsets.npy`: a pack's offset table beside it."""
    return path.with_suffix(".offsets.npy")


@dataclass(frozen=True, slots=True)
class Pack:
    """A packed file of thumbnails and its offsets [n + 1], written and closed."""

    path: Path
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def total_bytes(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def open(cls, path: Path) -> Pack:
        """A pack written earlier (a torchrun part), with its offsets checked against its size."""
        offsets = np.load(offsets_path(path), allow_pickle=False)
        check_offsets(offsets, path.stat().st_size, str(path))
        return cls(path, offsets)

    def move_to(self, path: Path) -> Pack:
        """Move both files to `path` (and its offsets path); a copy across file systems."""
        shutil.move(self.path, path)
        shutil.move(offsets_path(self.path), offsets_path(path))
        return Pack(path, self.offsets)


class PackWriter:
    """Appends thumbnails to a packed file; `close()` writes the offset table beside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115  # closed by close()
        self._offsets = [0]

    def add(self, data: bytes) -> None:
        """The next row's thumbnail (b"": that row has none)."""
        self._file.write(data)
        self._offsets.append(self._offsets[-1] + len(data))

    def close(self) -> Pack:
        self._file.close()
        offsets = np.asarray(self._offsets, dtype=np.int64)
        np.save(offsets_path(self.path), offsets)
        return Pack(self.path, offsets)

    def abort(self) -> None:
        self._file.close()


def merge_packs(packs: list[Pack], order: np.ndarray, out: Path) -> Pack:
    """One pack whose thumbnail j is thumbnail order[j] of the packs laid end to end."""
    if len(packs) == 1 and np.array_equal(order, np.arange(len(packs[0]))):
        return packs[0].move_to(out)
    starts = np.cumsum([0] + [len(p) for p in packs])  # first global row of each pack
    files = [os.open(p.path, os.O_RDONLY) for p in packs]
    writer = PackWriter(out)
    try:
        for row in order:
            which = int(np.searchsorted(starts, row, side="right")) - 1
            local = int(row - starts[which])
            begin, end = packs[which].offsets[local : local + 2]
            writer.add(os.pread(files[which], int(end - begin), int(begin)))
    except BaseException:
        writer.abort()
        raise
    finally:
        for fd in files:
            os.close(fd)
    return writer.close()


def check_offsets(offsets: np.ndarray, file_bytes: int, where: str) -> None:
    """Offsets are int64 [n + 1], start at 0, never decrease, and end at the file's size."""
    if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) < 1:
        raise ValueError(
            f"{where}: offsets must be int64 [N + 1], got {offsets.dtype} {offsets.shape}"
        )
    if offsets[0] != 0 or offsets[-1] != file_bytes or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{where}: offsets do not describe a file of {file_bytes} bytes")


class ThumbnailReader:
    """The thumbnails of a loaded index: one `os.pread` per thumbnail, safe from any thread."""

    def __init__(self, directory: Path, count: int, format: str) -> None:
        path = directory / THUMBNAILS_FILE
        # memory-mapped: pages of offsets are read as thumbnails are, not 8 bytes per row resident
        offsets = np.load(directory / OFFSETS_FILE, mmap_mode="r", allow_pickle=False)
        check_offsets(offsets, path.stat().st_size, str(path))
        if len(offsets) != count + 1:
            raise ValueError(f"{path}: {len(offsets) - 1} thumbnails for {count} rows")
        self.media_type = MEDIA_TYPES[format]
        self._offsets = offsets
        self._fd = os.open(path, os.O_RDONLY)

    def get(self, row_id: int) -> bytes | None:
        """Thumbnail `row_id`'s bytes; None when the row has none or is not in the index."""
        if not 0 <= row_id < len(self._offsets) - 1:
            return None
        begin, end = int(self._offsets[row_id]), int(self._offsets[row_id + 1])
        return os.pread(self._fd, end - begin, begin) if end > begin else None

    def close(self) -> None:
        os.close(self._fd)
        # the offsets' mapping holds the file (and its file system: an unmount) until it goes;
        # a closed reader has no thumbnails
        self._offsets = np.zeros(1, dtype=np.int64)
