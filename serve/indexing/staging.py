"""An index build's work on disk: one chunk per finished part, so a killed build resumes.

The staging folder (`--parts-dir`, default `OUT.parts`) holds `build.json`, what the build is
(model, inputs and their parts, image bounds, thumbnails, batch size), and for each finished
part i `chunk-{i:06d}`: `.npy` (its vectors [n, D]), `.jsonl` (its rows), `.thumbnails.bin` +
`.thumbnails.offsets.npy` (unless built without) and, written last, `.json` (its count and
skipped counts). Every file is written to a temporary name, fsynced and renamed, and the folder
fsynced, before the marker: a chunk whose `.json` exists survives SIGKILL or power loss whole.

A part's chunk depends on that part alone (its batches never cross into another part), so the
chunks do not care which process made them or when: `--resume` embeds only the parts without a
chunk, under torchrun or not, with any number of processes, and the merge in part order equals
an uninterrupted build. A staging folder whose `build.json` differs from the build asked for is
refused, with what differs; without `--resume` a partial build is refused with a message naming
`--resume` (hours of embedding are not thrown away unasked).

The merge copies the chunks' vectors, part by part, into one memory-mapped `vectors.npy` in the
staging folder: no process holds every vector (the on-disk tier, serve/indexing/ondisk.py, reads
them from there block by block). Nor every row: the merged rows (`StagedRows`) are read from the
chunks' `.jsonl` files, in part order, each time they are iterated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic_dir import fsync_dir
from serve.indexing.index import IndexRow
from serve.indexing.sources import Part
from serve.indexing.thumbnails import Pack, merge_packs, offsets_path

BUILD_FILE = "build.json"
MERGED_VECTORS_FILE = "vectors.npy"  # every chunk's vectors, in part order (memory-mapped)
STAGING_VERSION = 1


class PartialBuildError(ValueError):
    """A staging folder holds a partial build that this build may not continue or overwrite."""


@dataclass(slots=True)
class Chunk:
    """The embeddings of one part (or, merged, of all): vectors [n, D], rows, skipped counts
    and the rows' thumbnails (None: built without)."""

    vectors: np.ndarray
    rows: list[IndexRow] | StagedRows  # merged: read from the parts' files on each pass
    skipped: Counter[str]
    thumbnails: Pack | None = None


def parts_digest(parts: list[Part]) -> str:
    """A digest of the parts (kind, location, files and keys): a folder that gained or lost a
    file since the build began cuts into other parts, whose chunks cannot be reused."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps([part.kind, part.location, part.files, part.keys]).encode())
    return digest.hexdigest()


def artifact_digest(model_dir: Path) -> str:
    """A digest of the artifact's files (names, sizes, modification times): other weights at the
    same path make other vectors."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        info = path.stat()
        digest.update(f"{path.relative_to(model_dir)}:{info.st_size}:{info.st_mtime_ns};".encode())
    return digest.hexdigest()


def begin(staging: Path, build: dict[str, Any], *, resume: bool) -> list[int]:
    """The parts already finished in `staging` (none for a fresh build, whose `build.json` is
    written now); `PartialBuildError` for a partial build not to be continued. One process only
    (rank 0): the others learn the answer from it."""
    build = {"version": STAGING_VERSION, **build}
    build_file = staging / BUILD_FILE
    if not build_file.is_file():
        staging.mkdir(parents=True, exist_ok=True)
        _write_atomic(build_file, json.dumps(build, indent=1).encode())
        fsync_dir(staging)
        return []
    recorded = json.loads(build_file.read_text())
    done = finished(staging)
    if not resume:
        raise PartialBuildError(
            f"{staging} holds a partial build ({len(done)} of {build['part_count']} parts "
            "embedded): pass --resume to continue it, or remove that folder to start over"
        )
    differs = sorted(k for k in build.keys() | recorded.keys() if build.get(k) != recorded.get(k))
    if differs:
        raise PartialBuildError(
            f"{staging} holds a partial build of something else (it differs in: "
            f"{', '.join(differs)}); remove that folder to start over, or resume with the "
            "arguments it was begun with"
        )
    return done


def finished(staging: Path) -> list[int]:
    """The indices of the parts whose chunk is complete (its marker exists)."""
    return sorted(
        int(p.name[6:12]) for p in staging.glob("chunk-[0-9][0-9][0-9][0-9][0-9][0-9].json")
    )


def chunk_stem(staging: Path, part_index: int) -> Path:
    return staging / f"chunk-{part_index:06d}"


def thumbnails_path(staging: Path, part_index: int) -> Path:
    """Where a part's thumbnails are written while it is embedded (PackWriter)."""
    return staging / f"chunk-{part_index:06d}.thumbnails.bin"


def write_chunk(staging: Path, part_index: int, chunk: Chunk) -> None:
    """Make part `part_index`'s chunk durable; its marker, last, says it is complete."""
    stem = chunk_stem(staging, part_index)
    vectors = np.ascontiguousarray(chunk.vectors, dtype=np.float32)
    with open(f"{stem}.npy.tmp", "wb") as f:
        np.save(f, vectors)
        _flush(f)
    os.replace(f"{stem}.npy.tmp", f"{stem}.npy")
    rows = (json.dumps({"key": r.key, "caption": r.caption, "meta": r.meta}) for r in chunk.rows)
    _write_atomic(Path(f"{stem}.jsonl"), "".join(f"{line}\n" for line in rows).encode())
    if chunk.thumbnails is not None:  # written by PackWriter: made durable in place
        for path in (chunk.thumbnails.path, offsets_path(chunk.thumbnails.path)):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(staging)
    marker = {"count": len(chunk.rows), "skipped": dict(chunk.skipped)}
    _write_atomic(Path(f"{stem}.json"), json.dumps(marker).encode())
    fsync_dir(staging)


def read_chunk(staging: Path, part_index: int) -> Chunk:
    """Part `part_index`'s chunk: its vectors memory-mapped, its rows read from `.jsonl`."""
    stem = chunk_stem(staging, part_index)
    vectors, count, skipped = _chunk_vectors(staging, part_index)
    rows = list(_read_rows(Path(f"{stem}.jsonl")))
    if len(rows) != count:
        raise RuntimeError(f"chunk {stem}: {len(vectors)} vectors, {len(rows)} rows")
    return Chunk(vectors, rows, skipped, _chunk_pack(staging, part_index, count))


def _chunk_vectors(staging: Path, part_index: int) -> tuple[np.ndarray, int, Counter[str]]:
    """A chunk's vectors (memory-mapped: read when merged), row count and skipped counts."""
    stem = chunk_stem(staging, part_index)
    marker = json.loads(Path(f"{stem}.json").read_text())
    vectors = np.load(f"{stem}.npy", mmap_mode="r", allow_pickle=False)
    if len(vectors) != marker["count"]:
        raise RuntimeError(f"chunk {stem}: {len(vectors)} vectors, {marker['count']} rows")
    return vectors, int(marker["count"]), Counter(marker["skipped"])


def _chunk_pack(staging: Path, part_index: int, count: int) -> Pack | None:
    pack_path = thumbnails_path(staging, part_index)
    pack = Pack.open(pack_path) if pack_path.is_file() else None
    if pack is not None and len(pack) != count:
        raise RuntimeError(f"chunk {pack_path}: {len(pack)} thumbnails for {count} rows")
    return pack


def _read_rows(path: Path) -> Iterator[IndexRow]:
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            yield IndexRow(record["key"], record["caption"], record["meta"])


class StagedRows:
    """Every part's rows in part order, read from the chunks' `.jsonl` files on each pass, so
    the merge and the metadata write hold one row at a time, not the index's metadata."""

    def __init__(self, staging: Path, counts: list[int]) -> None:
        self._paths = [Path(f"{chunk_stem(staging, i)}.jsonl") for i in range(len(counts))]
        self._counts = counts

    def __len__(self) -> int:
        return sum(self._counts)

    def __iter__(self) -> Iterator[IndexRow]:
        for path, count in zip(self._paths, self._counts, strict=True):
            read = 0
            for row in _read_rows(path):
                read += 1
                yield row
            if read != count:
                raise RuntimeError(f"{path}: {read} rows, its marker says {count}")


def part_offsets(staging: Path, part_count: int) -> list[int]:
    """The id of each part's first row in the merged index (part order), from the markers."""
    counts = [_chunk_vectors(staging, i)[1] for i in range(part_count)]
    return [sum(counts[:i]) for i in range(part_count)]


def merge(staging: Path, part_count: int, dim: int, with_thumbnails: bool) -> Chunk:
    """Every part's chunk, in part order: the ids of a one-process uninterrupted build. Its
    rows are `StagedRows`: read from the chunks' files on each pass, never held all at once.

    The vectors are copied part by part into `MERGED_VECTORS_FILE`, memory-mapped, so no
    process holds them all (the on-disk tier reads them block by block from there)."""
    missing = sorted(set(range(part_count)) - set(finished(staging)))
    if missing:
        raise RuntimeError(f"{staging}: parts {missing[:10]} were not embedded")
    parts = [_chunk_vectors(staging, i) for i in range(part_count)]
    skipped: Counter[str] = Counter()
    for _, _, part_skipped in parts:
        skipped.update(part_skipped)
    counts = [count for _, count, _ in parts]
    rows = StagedRows(staging, counts)
    vectors = _merge_vectors(staging / MERGED_VECTORS_FILE, [v for v, _, _ in parts], dim)
    pack = None
    if with_thumbnails:
        packs = [_chunk_pack(staging, i, count) for i, count in enumerate(counts)]
        if any(p is None for p in packs):
            raise RuntimeError(f"{staging}: {packs.count(None)} chunks lack thumbnails")
        out = staging / "thumbnails.bin"
        if len(packs) == 1:  # merge_packs would move it: the chunk stays whole for a resume
            assert packs[0] is not None
            shutil.copyfile(packs[0].path, out)
            shutil.copyfile(offsets_path(packs[0].path), offsets_path(out))
            pack = Pack.open(out)
        else:
            pack = merge_packs([p for p in packs if p is not None], np.arange(len(rows)), out)
    return Chunk(vectors, rows, skipped, pack)


def _merge_vectors(path: Path, parts: list[np.ndarray], dim: int) -> np.ndarray:
    """`parts` [n_i, D] one after the other in a new .npy at `path`, memory-mapped read-only."""
    total = sum(len(part) for part in parts)
    merged = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(total, dim))
    start = 0
    for part in parts:
        merged[start : start + len(part)] = part
        start += len(part)
    merged.flush()
    del merged
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        _flush(f)
    os.replace(tmp, path)


def _flush(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
