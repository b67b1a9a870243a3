"""The search index on disk and in memory: exact FAISS inner product + SQLite metadata + manifest.

An index is a directory:

    index.json        manifest: format version, count, dim, index type and metric, the model that
                      built it, creation time, skipped-sample counts
    index.faiss       `faiss.IndexFlatIP` over unit vectors, so inner product == cosine similarity
    metadata.sqlite   table `items`: FAISS row id -> key, caption, JSON metadata

It is written to a temporary sibling directory and renamed into place, so a reader never sees a
half-written index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "index.json"
FAISS_FILE = "index.faiss"
METADATA_FILE = "metadata.sqlite"
INDEX_TYPE = "flat_ip"
METRIC = "inner_product"


class IndexLoadError(RuntimeError):
    """An index directory that cannot be used: a missing or corrupt file, or a wrong dimension."""


@dataclass(frozen=True, slots=True)
class IndexRow:
    """What is stored beside each vector."""

    key: str
    caption: str
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: FAISS row id, sample key, cosine similarity and the stored metadata."""

    id: int
    key: str
    score: float
    caption: str
    meta: dict[str, Any]


def write_index(
    out_dir: str | Path,
    embeddings: np.ndarray,
    rows: Sequence[IndexRow | tuple[str, str, dict[str, Any]]],
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """Write `embeddings` [N, D] (unit vectors) and their `rows` to `out_dir`, replacing it."""
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {vectors.shape}")
    if len(rows) != len(vectors):
        raise ValueError(f"{len(rows)} metadata rows for {len(vectors)} embeddings")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the result from a service running as another user
    try:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        faiss.write_index(index, str(tmp / FAISS_FILE))
        _write_metadata(tmp / METADATA_FILE, [_as_row(row) for row in rows])
        manifest = {
            "format_version": FORMAT_VERSION,
            "index_type": INDEX_TYPE,
            "metric": METRIC,
            "count": len(vectors),
            "dim": int(vectors.shape[1]),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **(manifest_extra or {}),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote index of %d x %d to %s", len(vectors), vectors.shape[1], out_dir)
    return out_dir


def _as_row(row: IndexRow | tuple[str, str, dict[str, Any]]) -> IndexRow:
    return row if isinstance(row, IndexRow) else IndexRow(*row)


def _write_metadata(path: Path, rows: list[IndexRow]) -> None:
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, key TEXT NOT NULL, "
            "caption TEXT NOT NULL, meta TEXT NOT NULL)"
        )
        db.executemany(
            "INSERT INTO items VALUES (?, ?, ?, ?)",
            ((i, r.key, r.caption, json.dumps(r.meta)) for i, r in enumerate(rows)),
        )
    db.close()  # the context manager only commits


class SearchIndex:
    """A loaded index: exact top-k by cosine similarity, with the stored metadata of each hit.

    Safe to share between threads: FAISS searches on a flat index are read-only, and the one
    read-only SQLite connection is guarded by a lock.
    """

    def __init__(
        self, directory: Path, index: faiss.Index, db: sqlite3.Connection, manifest: dict[str, Any]
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self._index = index
        self._db = db
        self._db_lock = threading.Lock()

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @classmethod
    def load(cls, directory: str | Path, *, expected_dim: int | None = None) -> SearchIndex:
        """Open an index; `expected_dim` (the model's embed_dim) must match its dimension."""
        directory = Path(directory)
        manifest = read_index_manifest(directory)
        index = _read_faiss(directory / FAISS_FILE)
        db = _open_metadata(directory / METADATA_FILE)
        try:
            _check_consistent(directory, manifest, index, db, expected_dim)
        except BaseException:
            db.close()
            raise
        log.info("loaded index %s: %d vectors of dim %d", directory, index.ntotal, index.d)
        return cls(directory, index, db, manifest)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Queries [Q, D] unit vectors -> per query the min(k, count) best hits, best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.count)
        if k == 0:
            return [[] for _ in queries]
        scores, ids = self._index.search(queries, k)  # [Q, k] each; id -1 only if count < k
        rows = self._rows({int(i) for i in ids.ravel() if i >= 0})
        return [
            [
                Hit(int(i), rows[int(i)].key, float(score), rows[int(i)].caption, rows[int(i)].meta)
                for i, score in zip(ids_q, scores_q, strict=True)
                if i >= 0
            ]
            for ids_q, scores_q in zip(ids, scores, strict=True)
        ]

    def _rows(self, ids: set[int]) -> dict[int, IndexRow]:
        placeholders = ",".join("?" * len(ids))
        with self._db_lock:
            found = self._db.execute(
                f"SELECT id, key, caption, meta FROM items WHERE id IN ({placeholders})",
                sorted(ids),
            ).fetchall()
        return {i: IndexRow(key, caption, json.loads(meta)) for i, key, caption, meta in found}

    def close(self) -> None:
        with self._db_lock:
            self._db.close()


def read_index_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an index, with an error naming the file when it is missing or unusable."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise IndexLoadError(f"{path} not found: {directory} is not an index directory")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexLoadError(f"{path} is not a readable index manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise IndexLoadError(
            f"{path}: index format {version!r} is not supported (expected {FORMAT_VERSION})"
        )
    return manifest


def _read_faiss(path: Path) -> faiss.Index:
    if not path.is_file():
        raise IndexLoadError(f"{path} not found")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:  # FAISS reports every read failure as RuntimeError
        raise IndexLoadError(f"{path} is not a readable FAISS index: {exc}") from exc


def _open_metadata(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise IndexLoadError(f"{path} not found")
    # Read-only; one connection shared by the threadpool, serialised by SearchIndex's lock.
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    try:
        db.execute("SELECT count(*) FROM items").fetchone()
    except sqlite3.DatabaseError as exc:
        db.close()
        raise IndexLoadError(f"{path} is not a readable metadata store: {exc}") from exc
    return db


def _check_consistent(
    directory: Path,
    manifest: dict[str, Any],
    index: faiss.Index,
    db: sqlite3.Connection,
    expected_dim: int | None,
) -> None:
    """The three files agree with each other, and the dimension with the model's."""
    if index.d != manifest.get("dim"):
        raise IndexLoadError(
            f"{directory / FAISS_FILE} has dim {index.d}, but "
            f"{MANIFEST_FILE} says {manifest.get('dim')}"
        )
    (rows,) = db.execute("SELECT count(*) FROM items").fetchone()
    if not index.ntotal == rows == manifest.get("count"):
        raise IndexLoadError(
            f"{directory}: {FAISS_FILE} has {index.ntotal} vectors, {METADATA_FILE} {rows} rows, "
            f"{MANIFEST_FILE} says {manifest.get('count')}; rebuild the index"
        )
    if expected_dim is not None and index.d != expected_dim:
        built_by = manifest.get("model", {}).get("name", "an unknown model")
        raise IndexLoadError(
            f"index {directory} has dim {index.d} (built by {built_by}) but the model's embed_dim "
            f"is {expected_dim}; rebuild it with `python -m serve.build_index` for this model"
        )
