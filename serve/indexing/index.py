"""The search index on disk and in memory: exact or approximate FAISS search + SQLite metadata.

An index is a directory:

    index.json        manifest: format version, count, dim, index type and metric, the FAISS
                      factory string and search parameters, the rerank factor, recall@10 measured
                      at build time, the model that built it, creation time, skipped-sample counts
    vectors.npy       the unit vectors [N, D] float32, row i = id i, so inner product == cosine
                      similarity; a plain .npy so that it can be memory-mapped
    index.faiss       the approximate index (`hnsw`, `ivfpq`) over the same rows; absent for `flat`
    metadata.sqlite   table `items`: row id -> key, caption, url, JSON metadata
    attributes.npz    columns of the metadata fields searches can filter on
                      (serve/indexing/filters.py); an index without it builds them from
                      metadata.sqlite when it loads
    thumbnails.bin, thumbnails.offsets.npy
                      optional: one small image per row (serve/indexing/thumbnails.py);
                      indices built without them (`--thumbnails none`, or before they
                      existed) load as before

Search is exact (`flat`: inner product against every stored vector) or approximate: the FAISS
index proposes k x rerank_factor candidates from compressed vectors, which are re-scored exactly
against `vectors.npy`, so the scores returned are always true cosine similarities. Choosing,
building and searching the FAISS index is `serve/indexing/vector_search.py`; this module is
the directory around it: files, manifest, metadata, loading.

It is written to a staging sibling directory and swapped into place in one step
(common/atomic_dir.py), so a reader finds the old index or the new one, never none and never
half of one; staging directories of builds that were killed are removed by the next build.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.atomic_dir import replace_dir, staging_dir
from serve.indexing.filters import (
    ATTRIBUTES_FILE,
    AttributeColumns,
    Filter,
    metas_of,
    parse_filter,
)
from serve.indexing.thumbnails import (
    OFFSETS_FILE,
    THUMBNAILS_FILE,
    Pack,
    ThumbnailReader,
    ThumbnailSpec,
)
from serve.indexing.vector_search import (
    FLAT,
    RECALL_K,
    IndexSpec,
    VectorSearcher,
    build_faiss_index,
    measure_recall,
    plan_index,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST_FILE = "index.json"
VECTORS_FILE = "vectors.npy"
FAISS_FILE = "index.faiss"
METADATA_FILE = "metadata.sqlite"
METRIC = "inner_product"
MMAP_AUTO_BYTES = 1 << 30
"""`SearchIndex.load(mmap=None)` memory-maps an index whose vectors + FAISS file reach this size."""


class IndexLoadError(RuntimeError):
    """An index directory that cannot be used: a missing or corrupt file, or a wrong dimension."""


@dataclass(frozen=True, slots=True)
class IndexRow:
    """What is stored beside each vector; `url` is the image's source URL where known."""

    key: str
    caption: str
    meta: dict[str, Any]
    url: str = ""


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: FAISS row id, sample key, cosine similarity and the stored metadata."""

    id: int
    key: str
    score: float
    caption: str
    meta: dict[str, Any]
    url: str = ""


def write_index(
    out_dir: str | Path,
    embeddings: np.ndarray,
    rows: Sequence[IndexRow | tuple[str, str, dict[str, Any]]],
    manifest_extra: dict[str, Any] | None = None,
    *,
    spec: IndexSpec | None = None,
    thumbnails: Pack | None = None,
    thumbnail_spec: ThumbnailSpec | None = None,
) -> Path:
    """Write `embeddings` [N, D] (unit vectors) and their `rows` to `out_dir`, replacing it.

    `spec` chooses the index type and its knobs (default: by size); the built index's recall@10
    against exact search is measured and written to the manifest. `thumbnails`: a pack with one
    thumbnail per row, made with `thumbnail_spec`; its files are moved into the index.
    """
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {vectors.shape}")
    if len(rows) != len(vectors):
        raise ValueError(f"{len(rows)} metadata rows for {len(vectors)} embeddings")
    if thumbnails is not None and len(thumbnails) != len(vectors):
        raise ValueError(f"{len(thumbnails)} thumbnails for {len(vectors)} embeddings")
    spec = spec or IndexSpec()
    plan = plan_index(spec, len(vectors), vectors.shape[1])
    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    try:
        np.save(tmp / VECTORS_FILE, vectors)
        start = time.perf_counter()
        index = build_faiss_index(plan, vectors)
        index_seconds = round(time.perf_counter() - start, 3)
        if index is not None:
            faiss.write_index(index, str(tmp / FAISS_FILE))
        searcher = VectorSearcher(
            vectors, index, search_params=plan.search_params, rerank_factor=plan.rerank_factor
        )
        recall = measure_recall(searcher, spec.recall_queries, seed=spec.seed)
        index_rows = [_as_row(row) for row in rows]
        _write_metadata(tmp / METADATA_FILE, index_rows)
        AttributeColumns.from_metas(metas_of(index_rows)).save(tmp / ATTRIBUTES_FILE)
        if thumbnails is not None:
            thumbnails.move_to(tmp / THUMBNAILS_FILE)
            thumbnail_info = (thumbnail_spec or ThumbnailSpec()).manifest()
            manifest_extra = {
                **(manifest_extra or {}),
                "thumbnails": {**thumbnail_info, "bytes": thumbnails.total_bytes},
            }
        manifest = {
            "format_version": FORMAT_VERSION,
            "build_id": uuid.uuid4().hex[:16],
            **plan.manifest(),
            "metric": METRIC,
            "count": len(vectors),
            "dim": int(vectors.shape[1]),
            **recall,
            "index_build_seconds": index_seconds,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **(manifest_extra or {}),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "wrote %s index of %d x %d to %s (recall@%d %s, index built in %.1f s)",
        plan.index_type,
        len(vectors),
        vectors.shape[1],
        out_dir,
        RECALL_K,
        recall["recall_at_10"],
        index_seconds,
    )
    return out_dir


def _as_row(row: IndexRow | tuple[str, str, dict[str, Any]]) -> IndexRow:
    return row if isinstance(row, IndexRow) else IndexRow(*row)


def _url(row: IndexRow) -> str:
    """The row's URL, or the `url` field of its JSON (img2dataset writes one) when not given."""
    url = row.url or row.meta.get("url")
    return url if isinstance(url, str) else ""


def _write_metadata(path: Path, rows: list[IndexRow]) -> None:
    with sqlite3.connect(path) as db:
        # The file lives in the temporary directory until the rename: no journal needed.
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, key TEXT NOT NULL, "
            "caption TEXT NOT NULL, url TEXT NOT NULL, meta TEXT NOT NULL)"
        )
        db.executemany(
            "INSERT INTO items VALUES (?, ?, ?, ?, ?)",
            ((i, r.key, r.caption, _url(r), json.dumps(r.meta)) for i, r in enumerate(rows)),
        )
    db.close()  # the context manager only commits


class SearchIndex:
    """A loaded index: top-k by cosine similarity, with the stored metadata of each hit.

    Safe to share between threads: searches only read (see `VectorSearcher`), and the one
    read-only SQLite connection is guarded by a lock.
    """

    def __init__(
        self,
        directory: Path,
        searcher: VectorSearcher,
        db: sqlite3.Connection,
        manifest: dict[str, Any],
        *,
        mmap: bool = False,
        thumbnails: ThumbnailReader | None = None,
        attributes: AttributeColumns | None = None,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.mmap = mmap
        self.thumbnails = thumbnails
        self.attributes = attributes or AttributeColumns.from_metas([{}] * len(searcher.vectors))
        self._searcher = searcher
        self._db = db
        self._db_lock = threading.Lock()

    @property
    def count(self) -> int:
        return int(self._searcher.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self._searcher.vectors.shape[1])

    @property
    def build_id(self) -> str:
        """Names this build of the index: a thumbnail URL carrying it never changes content."""
        return str(self.manifest.get("build_id") or self.manifest.get("created") or "0")

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        expected_dim: int | None = None,
        mmap: bool | None = None,
        threads: int | None = None,
    ) -> SearchIndex:
        """Open an index; `expected_dim` (the model's embed_dim) must match its dimension.

        `threads`: OpenMP threads per FAISS search, on whichever thread searches (None: every
        core; see `VectorSearcher`).

        `mmap`: memory-map the vectors and the FAISS index instead of reading them into memory
        (pages load on first use and are shared by every process that maps the same files);
        None = only when they are at least `MMAP_AUTO_BYTES` together.
        """
        directory = Path(directory)
        manifest = read_index_manifest(directory)
        if mmap is None:
            mmap = _data_bytes(directory) >= MMAP_AUTO_BYTES
        vectors = _read_vectors(directory / VECTORS_FILE, mmap)
        index = None if manifest["index_type"] == FLAT else _read_faiss(directory, mmap)
        db = _open_metadata(directory / METADATA_FILE)
        thumbnails = None
        try:
            _check_consistent(directory, manifest, vectors, index, db, expected_dim)
            thumbnails = _open_thumbnails(directory, manifest, len(vectors))
            attributes = _read_attributes(directory, db, len(vectors))
            searcher = VectorSearcher(
                vectors,
                index,
                search_params=manifest.get("search_params"),
                rerank_factor=int(manifest.get("rerank_factor", 1)),
                threads=threads,
            )
        except BaseException:
            db.close()
            if thumbnails is not None:
                thumbnails.close()
            raise
        log.info(
            "loaded %s index %s: %d vectors of dim %d%s",
            manifest["index_type"],
            directory,
            len(vectors),
            vectors.shape[1],
            " (memory-mapped)" if mmap else "",
        )
        return cls(
            directory,
            searcher,
            db,
            manifest,
            mmap=mmap,
            thumbnails=thumbnails,
            attributes=attributes,
        )

    def search(
        self, queries: np.ndarray, k: int, *, where: Filter | None = None
    ) -> list[list[Hit]]:
        """Queries [Q, D] unit vectors -> per query the min(k, count) best hits, best first.

        `where`: only rows matching this filter (`filter`), then min(k, matching rows) hits;
        FilterError when it names a field this index cannot filter.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.count)
        if k == 0:
            return [[] for _ in queries]
        allowed = None if where is None else self.attributes.mask(where)  # bool [count]
        # [Q, k] each; id -1 where fewer found
        scores, ids = self._searcher.search(queries, k, allowed=allowed)
        rows = self._rows({int(i) for i in ids.ravel() if i >= 0})
        return [
            [
                _hit(int(i), float(score), rows[int(i)])
                for i, score in zip(ids_q, scores_q, strict=True)
                if i >= 0
            ]
            for ids_q, scores_q in zip(ids, scores, strict=True)
        ]

    def filter(self, raw: Any, *, max_conditions: int, max_values: int) -> Filter:
        """A client's filter object -> a `Filter` for `search(where=...)`; FilterError names
        the field or operator that is wrong, or a field this index cannot filter."""
        where = parse_filter(raw, max_conditions=max_conditions, max_values=max_values)
        self.attributes.check(where)
        return where

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored unit vectors [len(ids), D] of rows `ids`, for "more like this" queries."""
        wanted = np.asarray([int(i) for i in ids], dtype=np.int64)
        bad = wanted[(wanted < 0) | (wanted >= self.count)]
        if len(bad):
            raise KeyError(
                f"no vector with id {int(bad[0])} in index {self.directory} ({self.count} rows)"
            )
        return np.array(self._searcher.vectors[wanted], dtype=np.float32).reshape(-1, self.dim)

    def rows(self, ids: Sequence[int]) -> dict[int, IndexRow]:
        """The stored metadata of rows `ids`; ids not in the index are absent from the result."""
        return self._rows({int(i) for i in ids})

    def describe(self) -> dict[str, Any]:
        """What a client or operator wants to know about this index, without the raw manifest."""
        return {
            "count": self.count,
            "dim": self.dim,
            "index_type": self.manifest["index_type"],
            "metric": self.manifest.get("metric", METRIC),
            "recall_at_10": self.manifest.get("recall_at_10"),
            "model": self.manifest.get("model", {}).get("name"),
            "created": self.manifest.get("created"),
            "directory": str(self.directory),
            "mmap": self.mmap,
            "thumbnails": self.manifest.get("thumbnails", {}).get("format")
            if self.thumbnails is not None
            else None,
            "filterable": self.attributes.fields(),
        }

    def _rows(self, ids: set[int]) -> dict[int, IndexRow]:
        if not ids:
            return {}
        found: list[tuple[int, str, str, str, str]] = []
        ordered = sorted(ids)
        with self._db_lock:
            for start in range(0, len(ordered), SQL_VARIABLES_PER_QUERY):
                chunk = ordered[start : start + SQL_VARIABLES_PER_QUERY]
                found += self._db.execute(
                    "SELECT id, key, caption, url, meta FROM items "
                    f"WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
        return {
            i: IndexRow(key, caption, json.loads(meta), url) for i, key, caption, url, meta in found
        }

    def close(self) -> None:
        with self._db_lock:
            self._db.close()
        if self.thumbnails is not None:
            self.thumbnails.close()


SQL_VARIABLES_PER_QUERY = 900  # below SQLite's historical limit of 999 bound parameters


def _hit(row_id: int, score: float, row: IndexRow) -> Hit:
    return Hit(row_id, row.key, score, row.caption, row.meta, row.url)


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
            f"{path}: index format {version!r} is not supported (expected {FORMAT_VERSION}); "
            "rebuild the index with `python -m serve.build_index`"
        )
    if not isinstance(manifest.get("index_type"), str):
        raise IndexLoadError(f"{path}: no index_type")
    return manifest


def _data_bytes(directory: Path) -> int:
    paths = [directory / VECTORS_FILE, directory / FAISS_FILE]
    return sum(path.stat().st_size for path in paths if path.is_file())


def _read_vectors(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise IndexLoadError(f"{path} not found")
    try:
        vectors = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # numpy's errors for a bad header or size
        raise IndexLoadError(f"{path} is not a readable .npy array: {exc}") from exc
    if vectors.ndim != 2 or vectors.dtype != np.float32 or not vectors.flags.c_contiguous:
        raise IndexLoadError(
            f"{path} holds a {vectors.dtype} array of shape {vectors.shape}; "
            "expected C-ordered float32 [N, D]"
        )
    return vectors


def _read_faiss(directory: Path, mmap: bool) -> faiss.Index:
    path = directory / FAISS_FILE
    if not path.is_file():
        raise IndexLoadError(f"{path} not found")
    # IO_FLAG_MMAP_IFC maps the codes of HNSW's storage and of IVF's inverted lists, plain or
    # fast-scan (IO_FLAG_MMAP maps only plain IVF lists); graph and coarse quantizer are read.
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except RuntimeError as exc:  # FAISS reports every read failure as RuntimeError
        raise IndexLoadError(f"{path} is not a readable FAISS index: {exc}") from exc


def _open_thumbnails(
    directory: Path, manifest: dict[str, Any], count: int
) -> ThumbnailReader | None:
    """The index's thumbnails, or None for an index built without them."""
    info = manifest.get("thumbnails")
    if info is None:
        return None
    path = directory / THUMBNAILS_FILE
    if not isinstance(info, dict) or info.get("format") not in ("webp", "jpeg"):
        raise IndexLoadError(
            f"{directory}: {MANIFEST_FILE} has a thumbnails entry of the wrong shape"
        )
    if not path.is_file() or not (directory / OFFSETS_FILE).is_file():
        raise IndexLoadError(f"{path} or {OFFSETS_FILE} not found; rebuild the index")
    try:
        return ThumbnailReader(directory, count, info["format"])
    except (OSError, ValueError) as exc:
        raise IndexLoadError(f"{path}: unusable thumbnails: {exc}; rebuild the index") from exc


def _read_attributes(directory: Path, db: sqlite3.Connection, count: int) -> AttributeColumns:
    """The filterable columns: from their file, or (an index written before there was one)
    built from the metadata store, one pass over its rows."""
    path = directory / ATTRIBUTES_FILE
    if path.is_file():
        try:
            return AttributeColumns.load(path, count)
        except ValueError as exc:
            raise IndexLoadError(f"{exc}; rebuild the index") from exc
    start = time.perf_counter()
    metas = (json.loads(meta) for (meta,) in db.execute("SELECT meta FROM items ORDER BY id"))
    columns = AttributeColumns.from_metas([m if isinstance(m, dict) else {} for m in metas])
    log.info(
        "%s has no %s: filter columns built from its metadata in %.1f s",
        directory,
        ATTRIBUTES_FILE,
        time.perf_counter() - start,
    )
    return columns


def _open_metadata(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise IndexLoadError(f"{path} not found")
    # Read-only; one connection shared by the threadpool, serialised by SearchIndex's lock.
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    try:
        db.execute("SELECT id, key, caption, url, meta FROM items LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        db.close()
        raise IndexLoadError(f"{path} is not a readable metadata store: {exc}") from exc
    return db


def _check_consistent(
    directory: Path,
    manifest: dict[str, Any],
    vectors: np.ndarray,
    index: faiss.Index | None,
    db: sqlite3.Connection,
    expected_dim: int | None,
) -> None:
    """The files agree with each other, and the dimension with the model's."""
    count, dim = vectors.shape
    if dim != manifest.get("dim") or (index is not None and index.d != dim):
        raise IndexLoadError(
            f"{directory}: {VECTORS_FILE} has dim {dim}, {FAISS_FILE} "
            f"{index.d if index is not None else '-'}, but {MANIFEST_FILE} says "
            f"{manifest.get('dim')}; rebuild the index"
        )
    (rows,) = db.execute("SELECT count(*) FROM items").fetchone()
    ntotal = index.ntotal if index is not None else count
    if not count == ntotal == rows == manifest.get("count"):
        raise IndexLoadError(
            f"{directory}: {VECTORS_FILE} has {count} vectors, {FAISS_FILE} {ntotal}, "
            f"{METADATA_FILE} {rows} rows, {MANIFEST_FILE} says {manifest.get('count')}; "
            "rebuild the index"
        )
    if expected_dim is not None and dim != expected_dim:
        built_by = manifest.get("model", {}).get("name", "an unknown model")
        raise IndexLoadError(
            f"index {directory} has dim {dim} (built by {built_by}) but the model's embed_dim "
            f"is {expected_dim}; rebuild it with `python -m serve.build_index` for this model"
        )
