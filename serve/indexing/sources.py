"""What an index build reads images from: shards, a folder of image files, img2dataset parquet.

`--data` names one or more inputs joined by `::`, each one of:

- webdataset shards (`.tar`, brace patterns, `pipe:` URLs): KEY.jpg + KEY.txt [+ KEY.json];
- a folder of image files, read recursively (.jpg .jpeg .png .webp .gif .bmp; .tif .tiff are
  read and counted as `unsupported_format`, a format the service refuses too; the layout of
  img2dataset's `--output_format files` too): a same-name `.txt` beside an image is its caption
  (optional), a same-name `.json` its metadata (optional); the image's path relative to the
  folder is its key and its `source` in the metadata, so a result leads back to the file;
- img2dataset's `--output_format parquet` files: one row per sample, the image bytes in a binary
  `jpg` (or png/webp/image) column, the caption in `txt` (or `caption`), every other scalar
  column (url, key, width, ...) kept as metadata.

Each input is cut into parts: a shard, a parquet file, or FOLDER_PART_FILES files of a folder in
sorted order. Parts are the unit of order (row ids follow parts) and of the torchrun split (rank r
reads parts r, r + N, ...). Anything else is refused up front with one line naming what it is.
Unusable samples are skipped and counted under `common.shards.SKIP_REASONS`, like shards' samples.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import braceexpand

from common.shards import RawSample, is_remote, raw_samples, read_shard, split_sources

log = logging.getLogger(__name__)

FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FOLDER_PART_FILES = 1000
PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")
PARQUET_CAPTION_COLUMNS = ("txt", "caption")
PARQUET_BATCH_ROWS = 256
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PartKind = Literal["shard", "files", "parquet"]


class UnsupportedInputError(ValueError):
    """An input that is none of the formats above; the message names what it looks like."""


@dataclass(frozen=True, slots=True)
class Part:
    """One unit of input: a shard URL, a parquet file, or some files of a folder."""

    kind: PartKind
    location: str  # the shard URL, the parquet path, or the folder
    files: tuple[str, ...] = ()  # kind "files": image paths relative to `location`


def list_parts(data: str) -> list[Part]:
    """The parts of every input in `data` (see the module doc), in order."""
    parts: list[Part] = []
    for spec in split_sources(data):
        if Path(spec).is_dir():
            parts.extend(_folder_parts(Path(spec)))
            continue
        for url in braceexpand.braceexpand(spec):
            parts.append(_file_part(url))
    if not parts:
        raise ValueError(f"no inputs in {data!r}")
    return parts


def read_part(part: Part, skipped: Counter[str]) -> Iterator[RawSample]:
    """The usable samples of one part, in order; unusable ones counted in `skipped`."""
    if part.kind == "shard":
        yield from raw_samples(read_shard(part.location, skipped), skipped)
    elif part.kind == "files":
        yield from _folder_samples(Path(part.location), part.files, skipped)
    else:
        yield from _parquet_samples(Path(part.location), skipped)


def _file_part(url: str) -> Part:
    if is_remote(url) or url.endswith(TAR_SUFFIXES):
        if not is_remote(url) and not Path(url).is_file():
            raise FileNotFoundError(f"shard {url!r} not found")
        return Part("shard", url)
    path = Path(url)
    if not path.is_file():
        raise FileNotFoundError(f"{url!r} not found (give shards, parquet files or a folder)")
    kind = sniff(path)
    if kind == "parquet":
        return Part("parquet", url)
    if kind == "tar":
        return Part("shard", url)
    raise UnsupportedInputError(
        f"{url}: {kind} is not an input an index is built from; give webdataset .tar shards, "
        "img2dataset .parquet files, or a folder of images"
    )


def sniff(path: Path) -> str:
    """What a local file is, from its first bytes: "parquet", "tar", or a description."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head[257:262] == b"ustar":
        return "tar"
    described = {
        b"PK\x03\x04": "a zip archive (unpack it and give the folder)",
        b"\x1f\x8b": "a gzip file",
        b"\xff\xd8\xff": "a single JPEG image (give its folder)",
        b"\x89PNG": "a single PNG image (give its folder)",
        b"{": "a JSON file",
    }
    for magic, description in described.items():
        if head.startswith(magic):
            return description
    return f"a file of unknown format ({path.suffix or 'no extension'})"


# --- a folder of image files --------------------------------------------------------------------


def _folder_parts(folder: Path) -> list[Part]:
    files = sorted(
        str(path.relative_to(folder))
        for path in _walk(folder)
        if path.suffix.lower() in FOLDER_IMAGE_EXTENSIONS
    )
    if not files:
        raise UnsupportedInputError(
            f"{folder}: a folder with no image files ({' '.join(FOLDER_IMAGE_EXTENSIONS)})"
        )
    return [
        Part("files", str(folder), tuple(files[start : start + FOLDER_PART_FILES]))
        for start in range(0, len(files), FOLDER_PART_FILES)
    ]


def _walk(folder: Path) -> Iterator[Path]:
    """Every file under `folder`; symlinked folders are not followed (no cycles), hidden skipped."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not name.startswith("."):
                yield Path(root) / name


def _folder_samples(
    folder: Path, files: tuple[str, ...], skipped: Counter[str]
) -> Iterator[RawSample]:
    for relative in files:
        path = folder / relative
        try:
            image = path.read_bytes()
        except OSError as exc:
            skipped["unreadable_file"] += 1
            log.warning("skipped %s: %s", path, exc.strerror or exc)
            continue
        meta = _sidecar_json(path.with_suffix(".json"))
        meta["source"] = relative
        key = str(Path(relative).with_suffix(""))
        yield RawSample(key, str(folder), image, _sidecar_text(path.with_suffix(".txt")), meta)


def _sidecar_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""  # captions are optional for a folder of pictures


def _sidecar_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


# --- img2dataset parquet --------------------------------------------------------------------------


def _parquet_samples(path: Path, skipped: Counter[str]) -> Iterator[RawSample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        skipped["failed_shard"] += 1
        log.warning("skipping parquet file %s: %s", path, exc)
        return
    names = parquet.schema_arrow.names
    image_column = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
    if image_column is None:
        raise UnsupportedInputError(
            f"{path}: a parquet file without image bytes (columns: {', '.join(names[:12])}); "
            "img2dataset writes such metadata files beside its .tar shards: index the shards"
        )
    caption_column = next((c for c in PARQUET_CAPTION_COLUMNS if c in names), None)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                yield from _parquet_sample(record, path, row, image_column, caption_column, skipped)
                row += 1
    except (OSError, pa.ArrowException) as exc:
        skipped["truncated_member"] += 1
        log.warning(
            "parquet file %s breaks off after %d rows (%s); the rest is skipped", path, row, exc
        )


def _parquet_sample(
    record: dict[str, Any],
    path: Path,
    row: int,
    image_column: str,
    caption_column: str | None,
    skipped: Counter[str],
) -> Iterator[RawSample]:
    image = record.pop(image_column)
    caption = record.pop(caption_column, None) if caption_column else None
    if not image:  # img2dataset keeps a row, without bytes, for each failed download
        skipped["missing_image"] += 1
        return
    meta = {k: v for k, v in record.items() if isinstance(v, str | int | float | bool)}
    key = str(record.get("key") or f"{path.stem}/{row:09d}")
    yield RawSample(key, str(path), image, str(caption or "").strip(), meta, row=row)
