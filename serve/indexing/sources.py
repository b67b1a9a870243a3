"""What an index build reads images from: shards, a folder of image files, img2dataset parquet.

`--data` names one or more inputs joined by `::`, each one of:

- webdataset shards (`.tar`, brace patterns, `pipe:` URLs): KEY.jpg + KEY.txt [+ KEY.json];
- a folder of image files, read recursively (.jpg .jpeg .png .webp .gif .bmp; .tif .tiff are
  read and counted as `unsupported_format`, a format the service refuses too; the layout of
  img2dataset's `--output_format files` too): a same-name `.txt` beside an image is its caption
  (optional), a same-name `.json` its metadata (optional); the image's path relative to the
  folder is its `source` in the metadata, so a result leads back to the file, and the path
  without its extension its key (with it, where files of one folder share a stem: `china.bmp`,
  `china.webp`); the walk is iterative, so a folder's depth is bounded by the file system only;
- img2dataset's `--output_format parquet` files: one row per sample, the image bytes in a binary
  `jpg` (or png/webp/image) column, the caption in `txt` (or `caption`), every other scalar
  column (url, key, width, ...) kept as metadata;
- img2dataset's output folder itself: a folder with no image files but `.tar` shards at its top
  (webdataset output; the `.parquet` beside them are metadata only) is read as those shards,
  one with `.parquet` files only (parquet output) as those.

A local path with `*`, `?` or `[` that is not a file is a glob, expanded in sorted order (as a
shell would, for a pattern given in quotes); one that matches nothing, or a remote URL with
them, is refused with the brace form that names shards without listing them
(`shards/{00000..00009}.tar`).

Each input is cut into parts: a shard, a parquet file, or FOLDER_PART_FILES files of a folder in
sorted order. Parts are the unit of order (row ids follow parts) and of the torchrun split (rank r
reads parts r, r + N, ...). Anything else is refused up front with one line naming what it is.
Unusable samples are skipped and counted under `common.shards.SKIP_REASONS`, like shards' samples.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
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
GLOB_CHARACTERS = frozenset("*?[")
PartKind = Literal["shard", "files", "parquet"]


class UnsupportedInputError(ValueError):
    """An input that is none of the formats above; the message names what it looks like."""


@dataclass(frozen=True, slots=True)
class Part:
    """One unit of input: a shard URL, a parquet file, or some files of a folder."""

    kind: PartKind
    location: str  # the shard URL, the parquet path, or the folder
    files: tuple[str, ...] = ()  # kind "files": image paths relative to `location`
    keys: tuple[str, ...] = ()  # kind "files": each file's key (`folder_keys`)


def list_parts(data: str) -> list[Part]:
    """The parts of every input in `data` (see the module doc), in order."""
    parts: list[Part] = []
    for spec in split_sources(data):
        if Path(spec).is_dir():
            parts.extend(_folder_parts(Path(spec)))
            continue
        for url in braceexpand.braceexpand(spec):
            parts.extend(_file_part(match) for match in _expand_glob(url))
    if not parts:
        raise ValueError(f"no inputs in {data!r}")
    return parts


def read_part(
    part: Part, skipped: Counter[str], *, max_image_bytes: int | None = None
) -> Iterator[RawSample]:
    """The usable samples of one part, in order; unusable ones counted in `skipped`. An image
    over `max_image_bytes` is `file_too_large`: a folder's file is not even read (its size is
    known first), a shard's member or a parquet row is dropped before anything decodes it."""
    if part.kind == "shard":
        samples = raw_samples(read_shard(part.location, skipped), skipped)
    elif part.kind == "files":
        folder = Path(part.location)
        samples = _folder_samples(folder, part.files, part.keys, skipped, max_image_bytes)
    else:
        samples = _parquet_samples(Path(part.location), skipped)
    for sample in samples:
        if max_image_bytes is not None and len(sample.image) > max_image_bytes:
            skipped["file_too_large"] += 1
            log.warning("skipped %s: %d bytes", sample.key, len(sample.image))
            continue
        yield sample


def _expand_glob(url: str) -> list[str]:
    """`url`'s local matches if it is a glob pattern (see the module doc), else `url` itself."""
    pattern = GLOB_CHARACTERS.intersection(url)
    if not pattern or url.startswith("pipe:") or (not is_remote(url) and Path(url).exists()):
        return [url]  # a pipe: command is the shell's to read
    hint = f"name the files with braces instead, e.g. {_brace_example(url)!r}"
    if is_remote(url):
        raise UnsupportedInputError(f"{url}: a wildcard in a URL cannot be listed; {hint}")
    matches = sorted(glob.glob(url))
    if not matches:
        raise FileNotFoundError(f"{url!r} matches no file; {hint}")
    return matches


def _brace_example(url: str) -> str:
    """`url` with its last path element as img2dataset's numbered shards in brace form."""
    head, _, name = url.rpartition("/")
    suffix = next((s for s in (*TAR_SUFFIXES, ".parquet") if name.endswith(s)), ".tar")
    return f"{head}/{{00000..00009}}{suffix}" if head else f"{{00000..00009}}{suffix}"


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
        return _img2dataset_output_parts(folder)
    keys = folder_keys(files)  # over the whole folder: files sharing a stem may span two parts
    return [
        Part(
            "files",
            str(folder),
            tuple(files[start : start + FOLDER_PART_FILES]),
            tuple(keys[start : start + FOLDER_PART_FILES]),
        )
        for start in range(0, len(files), FOLDER_PART_FILES)
    ]


def folder_keys(files: Sequence[str]) -> list[str]:
    """Each file's key: its relative path without the extension (`2024/beach`), as indices
    built before always had it; with the extension (`2024/beach.png`) where that would be
    another file's key too, so `china.bmp` and `china.webp` stay two items. Paths are unique,
    so the loop ends: each round gives at least one more file its full path."""
    keys = [str(Path(name).with_suffix("")) for name in files]
    while True:
        counts = Counter(keys)
        shared = [i for i, key in enumerate(keys) if counts[key] > 1 and key != files[i]]
        if not shared:
            return keys
        for i in shared:
            keys[i] = files[i]


def _img2dataset_output_parts(folder: Path) -> list[Part]:
    """A folder without images as img2dataset leaves its output: its shards, else its parquet
    files (with the webdataset format, the parquet files hold only the metadata)."""
    shards = sorted(str(p) for p in folder.iterdir() if p.name.endswith(TAR_SUFFIXES))
    parquets = sorted(str(p) for p in folder.glob("*.parquet"))
    if not shards and not parquets:
        raise UnsupportedInputError(
            f"{folder}: a folder with no image files ({' '.join(FOLDER_IMAGE_EXTENSIONS)}), "
            "no .tar shards and no .parquet files"
        )
    kind: PartKind = "shard" if shards else "parquet"
    log.info("%s: no image files; reading its %d %s files", folder, len(shards or parquets), kind)
    return [Part(kind, location) for location in shards or parquets]


def _walk(folder: Path) -> Iterator[Path]:
    """Every file under `folder`, hidden ones skipped; symlinked folders are not followed (no
    cycles). A stack, not recursion (os.walk recurses): a folder 1,000 levels deep is a folder;
    one that cannot be listed is logged and left out."""
    pending = [folder]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                listed = [entry for entry in entries if not entry.name.startswith(".")]
        except OSError as exc:
            log.warning("skipped folder %s: %s", directory, exc.strerror or exc)
            continue
        for entry in listed:
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            elif not entry.is_dir():  # a symlink to a folder is neither walked nor a file
                yield Path(entry.path)


def _folder_samples(
    folder: Path,
    files: tuple[str, ...],
    keys: tuple[str, ...],
    skipped: Counter[str],
    max_image_bytes: int | None,
) -> Iterator[RawSample]:
    for relative, key in zip(files, keys, strict=True):
        path = folder / relative
        try:
            image = _read_file(path, max_image_bytes)
        except OSError as exc:
            skipped["unreadable_file"] += 1
            log.warning("skipped %s: %s", path, exc.strerror or exc)
            continue
        if image is None:
            skipped["file_too_large"] += 1
            log.warning("skipped %s: over %d bytes", path, max_image_bytes)
            continue
        meta = _sidecar_json(path.with_suffix(".json"))
        meta["source"] = relative
        yield RawSample(key, str(folder), image, _sidecar_text(path.with_suffix(".txt")), meta)


def _read_file(path: Path, max_bytes: int | None) -> bytes | None:
    """The file's bytes; None if it is over `max_bytes` (known from its size, or found while
    reading: it may grow). OSError for what is no regular file: opening a FIFO blocks."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"not a regular file ({stat.filemode(info.st_mode)})")
    if max_bytes is not None and info.st_size > max_bytes:
        return None
    with open(path, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    return None if max_bytes is not None and len(data) > max_bytes else data


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
