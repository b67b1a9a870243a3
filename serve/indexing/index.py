"""The search index on disk and in memory: exact or approximate FAISS search + SQLite metadata.

An index is a directory:

    index.json        manifest: format version, count, dim, index type and metric, the FAISS
                      factory string and search parameters, the rerank factor, recall@10 measured
                      at build time, the model that built it, creation time, skipped-sample counts
    vectors.npy       the unit vectors [N, D] float32 (the on-disk tier: float16), row i = id i,
                      so inner product == cosine similarity; a plain .npy that can be memory-mapped
    index.faiss       the approximate index (`hnsw`, `ivfpq`) over the same rows; absent for `flat`
    index.ivfdata     the on-disk tier's inverted lists (manifest `on_disk`, indexing/ondisk.py),
                      memory-mapped and never changed by updates (indexing/delta.py)
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

import itertools
import json
import logging
import mmap as mmap_module
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import faiss
import numpy as np

from common.atomic_dir import remove_stale, replace_dir, staging_dir
from serve.indexing.compaction import compact
from serve.indexing.filters import (
    ATTRIBUTES_FILE,
    AttributeColumns,
    Filter,
    metas_of,
    parse_filter,
)
from serve.indexing.journal import (
    JOURNAL_FILE,
    IndexReadOnlyError,
    Journal,
    Record,
    WriterLock,
    read_records,
)
from serve.indexing.journal import (
    JournalWriteError as JournalWriteError,
)
from serve.indexing.layout import (
    CREATE_ITEMS_TABLE,
    FAISS_FILE,
    IDS_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    VECTORS_FILE,
)
from serve.indexing.ondisk import (
    build_ondisk_index,
    merge_lists,
    read_ondisk_index,
    write_half_vectors,
)
from serve.indexing.rerank_tuning import RecallProbe, choose_rerank_factor
from serve.indexing.store import checked_addition
from serve.indexing.thumbnails import (
    OFFSETS_FILE,
    THUMBNAILS_FILE,
    Pack,
    ThumbnailReader,
    ThumbnailSpec,
)
from serve.indexing.updates import ItemTable
from serve.indexing.vector_search import (
    FLAT,
    RECALL_K,
    IndexPlan,
    IndexSpec,
    VectorSearcher,
    build_faiss_index,
    plan_index,
)

if TYPE_CHECKING:  # part_lists imports staging, which imports this module
    from serve.indexing.part_lists import PartLists

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
METRIC = "inner_product"
ROW_BATCH = 65_536  # metadata rows written (and held) at a time
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


class RowSource(Protocol):
    """Rows that can be counted and read in order, once or more: a list, or a build's rows read
    from its parts' files (staging.StagedRows), which `write_index` never holds all at once."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[IndexRow | tuple[str, str, dict[str, Any]]]: ...


def write_index(
    out_dir: str | Path,
    embeddings: np.ndarray,
    rows: RowSource,
    manifest_extra: dict[str, Any] | None = None,
    *,
    spec: IndexSpec | None = None,
    thumbnails: Pack | None = None,
    thumbnail_spec: ThumbnailSpec | None = None,
    text_queries: np.ndarray | None = None,
    lists: PartLists | None = None,
) -> Path:
    """Write `embeddings` [N, D] (unit vectors) and their `rows` to `out_dir`, replacing it.

    `spec` chooses the index type and its knobs (default: by size); the built index's recall@10
    against exact search is measured and written to the manifest. `thumbnails`: a pack with one
    thumbnail per row, made with `thumbnail_spec`; its files are moved into the index.
    `text_queries` [Q, D]: captions through the text tower, whose recall@10 against exact
    search is written beside the image-query figure (`text_recall_at_10`).

    `embeddings` may be memory-mapped: the on-disk tier (`plan.on_disk`) reads it block by
    block and never holds it whole. `lists`: that tier's lists already added by the build's
    processes (serve/indexing/part_lists.py), merged here instead of added again. `rows` are
    read in batches (`ROW_BATCH`) into SQLite and the filter columns.
    """
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {vectors.shape}")
    if len(rows) != len(vectors):
        raise ValueError(f"{len(rows)} metadata rows for {len(vectors)} embeddings")
    if thumbnails is not None and len(thumbnails) != len(vectors):
        raise ValueError(f"{len(thumbnails)} thumbnails for {len(vectors)} embeddings")
    spec = spec or IndexSpec()
    plan = lists.plan if lists is not None else plan_index(spec, len(vectors), vectors.shape[1])
    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    try:
        index, index_seconds = _build_vector_index(plan, vectors, tmp, lists)
        served = _save_vectors(tmp / VECTORS_FILE, vectors, plan.on_disk)
        if index is not None:
            faiss.write_index(index, str(tmp / FAISS_FILE))
        searcher = VectorSearcher(
            served, index, search_params=plan.search_params, rerank_factor=plan.rerank_factor
        )
        recall = _measure_and_tune(searcher, spec, text_queries)
        _write_rows(tmp, rows)
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
            "rerank_factor": searcher.rerank_factor,  # the plan's, or the one tuning chose
            "metric": METRIC,
            "count": len(vectors),
            "dim": int(vectors.shape[1]),
            "vectors_dtype": str(served.dtype),
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


def _measure_and_tune(
    searcher: VectorSearcher, spec: IndexSpec, text_queries: np.ndarray | None
) -> dict[str, Any]:
    """The manifest's recall figures; for an approximate index whose spec leaves the rerank
    factor open, the factor is raised to `spec.recall_target` first (`rerank_tuning`)."""
    if searcher.exact:  # nothing to measure or tune
        figures: dict[str, Any] = {"recall_at_10": 1.0, "recall_queries": 0}
        if text_queries is not None:
            figures["text_recall_at_10"] = 1.0 if len(text_queries) else None
            figures["text_recall_queries"] = len(text_queries)
        return {**figures, "rerank_tuning": None}
    probe = RecallProbe.sample(searcher.vectors, spec.recall_queries, text_queries, spec.seed)
    if spec.rerank_factor is not None:
        return {**probe.measure(searcher), "rerank_tuning": None}
    figures, tuning = choose_rerank_factor(searcher, probe, spec.recall_target)
    return {**figures, "rerank_tuning": tuning}


def _build_vector_index(
    plan: IndexPlan, vectors: np.ndarray, directory: Path, lists: PartLists | None
) -> tuple[faiss.Index | None, float]:
    """`plan`'s FAISS index over `vectors` (None: flat), and the seconds it took (for part
    lists: training and the ranks' adds, measured where they ran, plus the merge here)."""
    start = time.perf_counter()
    if lists is not None:
        index = lists.trained()
        merge_lists(index, lists.files(), directory)
        if index.ntotal != len(vectors):
            raise RuntimeError(f"the parts' lists hold {index.ntotal} of {len(vectors)} vectors")
        merged = time.perf_counter() - start
        return index, round(lists.train_seconds + lists.add_seconds + merged, 3)
    built = (
        build_ondisk_index(plan, vectors, directory)
        if plan.on_disk
        else build_faiss_index(plan, vectors)
    )
    return built, round(time.perf_counter() - start, 3)


def _save_vectors(path: Path, vectors: np.ndarray, on_disk: bool) -> np.ndarray:
    """`vectors` as `vectors.npy`; the array searches re-rank against. The on-disk tier's is
    float16, written block by block (`write_half_vectors`), so `vectors` is never copied whole."""
    if on_disk:
        return write_half_vectors(path, vectors)
    np.save(path, vectors)
    return vectors


def _as_row(row: IndexRow | tuple[str, str, dict[str, Any]]) -> IndexRow:
    return row if isinstance(row, IndexRow) else IndexRow(*row)


def _url(row: IndexRow) -> str:
    """The row's URL, or the `url` field of its JSON (img2dataset writes one) when not given."""
    url = row.url or row.meta.get("url")
    return url if isinstance(url, str) else ""


def _write_rows(directory: Path, rows: RowSource) -> None:
    """`rows` into `metadata.sqlite` and the filter columns (`attributes.npz`), `ROW_BATCH`
    rows at a time: one pass, never the whole metadata in memory."""
    columns = AttributeColumns()
    with sqlite3.connect(directory / METADATA_FILE) as db:
        # The file lives in the temporary directory until the rename: no journal needed.
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute(CREATE_ITEMS_TABLE)
        stream = (_as_row(row) for row in rows)
        first_id = 0
        while batch := list(itertools.islice(stream, ROW_BATCH)):
            db.executemany(
                "INSERT INTO items VALUES (?, ?, ?, ?, ?)",
                (
                    (first_id + i, r.key, r.caption, _url(r), json.dumps(r.meta))
                    for i, r in enumerate(batch)
                ),
            )
            columns.append(metas_of(batch))
            first_id += len(batch)
    db.close()  # the context manager only commits
    columns.save(directory / ATTRIBUTES_FILE)


class SearchIndex:
    """A loaded index: top-k by cosine similarity, with the stored metadata of each hit; and,
    when this process writes it, adds and deletes of items (journalled, see `add`).

    Safe to share between threads. Searches take a shared lock and run side by side; an update
    is first made durable in the journal, then applied under the exclusive lock, so a search
    sees each update entirely or not at all. The read-only SQLite connection has its own lock.
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
        items: ItemTable | None = None,
        journal: Journal | None = None,
        writer: WriterLock | None = None,
        read_only_reason: str | None = None,
        compact_journal_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.mmap = mmap
        self._snapshot_thumbnails = thumbnails
        self.thumbnails = ItemThumbnails(self, thumbnails) if thumbnails is not None else None
        self.attributes = attributes or AttributeColumns.from_metas([{}] * len(searcher.vectors))
        self._mask_cache: OrderedDict[tuple[Filter | None, int], np.ndarray] = OrderedDict()
        self._mask_lock = threading.Lock()
        self._searcher = searcher
        self._db = db
        self._db_lock = threading.Lock()
        self._items = items or ItemTable(np.arange(len(searcher.vectors)), len(searcher.vectors), 0)
        self._journal = journal
        self._writer = writer
        self.read_only_reason = read_only_reason if journal is None else None
        self.compact_journal_bytes = compact_journal_bytes
        self._lock = ReadWriteLock()
        self._write_mutex = threading.Lock()  # one update at a time, journal write included
        self._compaction = threading.Lock()  # one compaction at a time
        self._compactor: threading.Thread | None = None
        self._successor: SearchIndex | None = None  # set when a reload replaced this version

    searches_in_threadpool = False
    """FAISS searches in this process, bounded by the index: on the encoder's thread."""

    @property
    def writable(self) -> bool:
        return self._journal is not None

    @property
    def next_id(self) -> int:
        """The id the next added item takes (ids are never reused)."""
        return self._items.next_id

    @property
    def count(self) -> int:
        """Live items (deleted ones not counted)."""
        return self._items.live

    @property
    def dim(self) -> int:
        return int(self._searcher.vectors.shape[1])

    @property
    def build_id(self) -> str:
        """Names this build of the index: a thumbnail URL carrying it never changes content
        (item ids are never reused, so updates and compactions keep it)."""
        return str(self.manifest.get("build_id") or self.manifest.get("created") or "0")

    @property
    def thumbnail_spec(self) -> ThumbnailSpec | None:
        """How this index's thumbnails are made; None when it has none."""
        info = self.manifest.get("thumbnails")
        if self.thumbnails is None or not isinstance(info, dict):
            return None
        return ThumbnailSpec(
            format=info["format"],
            max_side_px=int(info.get("max_side_px", 256)),
            quality=int(info.get("quality", 80)),
        )

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        expected_dim: int | None = None,
        mmap: bool | None = None,
        threads: int | None = None,
        writable: bool | None = None,
        compact_journal_bytes: int | None = None,
    ) -> SearchIndex:
        """Open an index; `expected_dim` (the model's embed_dim) must match its dimension.

        `threads`: OpenMP threads per FAISS search, on whichever thread searches (None: every
        core; see `VectorSearcher`).

        `mmap`: memory-map the vectors and the FAISS index instead of reading them into memory
        (pages load on first use and are shared by every process that maps the same files);
        None = only when they are at least `MMAP_AUTO_BYTES` together. A writable index reads
        its FAISS index into memory (updates change it), and its vectors on the first add.

        `writable`: take the index's write lock (True: or raise `IndexReadOnlyError`; None:
        when free and the directory is writable; False: never). Either way the journal's
        updates since the snapshot are applied. `compact_journal_bytes`: compact in the
        background once the journal reaches this size (None: only when asked).
        """
        directory = Path(directory)
        if read_index_manifest(directory).get("on_disk"):  # larger than memory: always mapped
            mmap = True  # (its updates live beside the mapped files: serve/indexing/delta.py)
        writer, reason = _writer_lock(directory, writable)
        try:
            return cls._open(
                directory, expected_dim, mmap, threads, writer, reason, compact_journal_bytes
            )
        except BaseException:
            if writer is not None:
                writer.release()
            raise

    @classmethod
    def _open(
        cls,
        directory: Path,
        expected_dim: int | None,
        mmap: bool | None,
        threads: int | None,
        writer: WriterLock | None,
        reason: str | None,
        compact_journal_bytes: int | None,
    ) -> SearchIndex:
        manifest = read_index_manifest(directory)
        if mmap is None:
            mmap = _data_bytes(directory) >= MMAP_AUTO_BYTES
        on_disk = bool(manifest.get("on_disk"))
        vectors = _read_vectors(directory / VECTORS_FILE, mmap, random_reads=on_disk)
        index = None
        if manifest["index_type"] != FLAT:
            index = _read_faiss(directory, mmap and writer is None, on_disk)
        db = _open_metadata(directory / METADATA_FILE)
        thumbnails = None
        try:
            _check_consistent(directory, manifest, vectors, index, db, expected_dim)
            thumbnails = _open_thumbnails(directory, manifest, len(vectors))
            searcher = VectorSearcher(
                vectors,
                index,
                search_params=manifest.get("search_params"),
                rerank_factor=int(manifest.get("rerank_factor", 1)),
                threads=threads,
            )
            attributes = _read_attributes(directory, db, len(vectors))
            items = _item_table(directory, manifest, len(vectors))
            journal = _replay(directory, items, searcher, attributes, writable=writer is not None)
        except BaseException:
            db.close()
            if thumbnails is not None:
                thumbnails.close()
            raise
        log.info(
            "loaded %s index %s: %d items of dim %d%s%s",
            manifest["index_type"],
            directory,
            items.live,
            vectors.shape[1],
            " (memory-mapped)" if mmap else "",
            "" if writer is not None else f" (read-only: {reason})",
        )
        return cls(
            directory,
            searcher,
            db,
            manifest,
            mmap=mmap,
            thumbnails=thumbnails,
            attributes=attributes,
            items=items,
            journal=journal,
            writer=writer,
            read_only_reason=reason,
            compact_journal_bytes=compact_journal_bytes,
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
        with self._lock.shared():
            k = min(k, self.count)
            if k == 0:
                return [[] for _ in queries]
            scores, rows = self._search_rows(
                queries, k, where
            )  # [Q, k] each; row -1 if fewer found
            ids = np.where(rows >= 0, self._items.ids[np.maximum(rows, 0)], -1)
            found = self._rows_locked({int(i) for i in ids.ravel() if i >= 0})
        return [
            [
                _hit(int(i), float(score), found[int(i)])
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

    def _search_rows(
        self, queries: np.ndarray, k: int, where: Filter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k live rows (matching `where`). Deleted rows an IVF index has dropped from its
        lists need no mask; those exact search and an HNSW graph still hold are masked out, with
        the rows a filter does not match (serve/indexing/filtered_search.py keeps k coming back
        however many are masked)."""
        if where is not None:
            return self._searcher.search(queries, k, allowed=self._allowed(where))
        if self._items.deleted == 0 or self._searcher.deletes_in_index:
            return self._searcher.search(queries, k)
        return self._searcher.search(queries, k, allowed=self._allowed(None))

    def _allowed(self, where: Filter | None) -> np.ndarray:
        """bool [rows], read-only: the live rows matching `where` (None: every live row). The
        masks of the last
        MASK_CACHE_ENTRIES filters are kept until the next update, so a repeated filter costs
        no pass over the rows (the mask: 0.1-0.3 ms per condition at 1M rows)."""
        items = self._items
        key = (where, items.seq)  # any add or delete moves seq; adopt() empties the cache
        with self._mask_lock:
            cached = self._mask_cache.get(key)
            if cached is not None:
                self._mask_cache.move_to_end(key)
                return cached
        alive = items.alive_mask()
        if where is None:
            allowed = np.ones(items.rows, dtype=bool) if alive is None else alive.copy()
        else:
            allowed = self.attributes.mask(where)
            if alive is not None:
                allowed &= alive
        allowed.flags.writeable = False  # searches may keep what they derive from it
        with self._mask_lock:
            self._mask_cache[key] = allowed
            while len(self._mask_cache) > MASK_CACHE_ENTRIES:
                self._mask_cache.popitem(last=False)
        return allowed

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored unit vectors [len(ids), D] of items `ids`, for "more like this" queries."""
        with self._lock.shared():
            rows, missing = self._items.rows_of(ids)
            if missing:
                raise KeyError(
                    f"no item with id {missing[0]} in index {self.directory} ({self.count} items)"
                )
            vectors = np.array(self._searcher.vectors[rows], dtype=np.float32)
        return vectors.reshape(-1, self.dim)

    def rows(self, ids: Sequence[int]) -> dict[int, IndexRow]:
        """The stored metadata of items `ids`; ids not in the index are absent from the result."""
        with self._lock.shared():
            return self._rows_locked({int(i) for i in ids})

    def get(self, item_id: int) -> IndexRow:
        """The metadata of item `item_id`; KeyError when there is no such (live) item."""
        found = self.rows([item_id])
        if item_id not in found:
            raise KeyError(f"no item with id {item_id} in this index")
        return found[item_id]

    def live_items(
        self, batch_rows: int, *, after_id: int = -1
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[IndexRow], list[bytes | None]]]:
        """Every live item with an id above `after_id`, in id order, `batch_rows` rows at a
        time: (ids [n], vectors [n, D], rows, thumbnails), what an export to another store
        reads. Memory is one batch (a memory-mapped snapshot is read page by page)."""
        start = int(np.searchsorted(self._items.ids, after_id, side="right"))
        for begin in range(start, self._items.rows, batch_rows):
            with self._lock.shared():
                end = min(begin + batch_rows, self._items.rows)
                alive = self._items.alive_mask()
                keep = slice(None) if alive is None else alive[begin:end]
                ids = self._items.ids[begin:end][keep]
                vectors = np.array(self._searcher.vectors[begin:end][keep], dtype=np.float32)
                found = self._rows_locked({int(i) for i in ids})
            rows = [found[int(i)] for i in ids]
            thumbnails = [self.thumbnail_of(int(i)) for i in ids]
            yield ids, vectors, rows, thumbnails

    def describe(self) -> dict[str, Any]:
        """What a client or operator wants to know about this index, without the raw manifest."""
        return {
            "count": self.count,
            "dim": self.dim,
            "index_type": self.manifest["index_type"],
            "metric": self.manifest.get("metric", METRIC),
            "recall_at_10": self.manifest.get("recall_at_10"),
            "text_recall_at_10": self.manifest.get("text_recall_at_10"),
            "on_disk": bool(self.manifest.get("on_disk")),
            "model": self.manifest.get("model", {}).get("name"),
            "created": self.manifest.get("created"),
            "directory": str(self.directory),
            "mmap": self.mmap,
            "thumbnails": self.manifest.get("thumbnails", {}).get("format")
            if self.thumbnails is not None
            else None,
            "filterable": self.attributes.fields(),
            "writable": self.writable,
            "read_only_reason": self.read_only_reason,
            "deleted_pending": self._items.deleted,
            "journal_bytes": self._journal.bytes if self._journal is not None else None,
        }

    def add(
        self,
        vectors: np.ndarray,
        rows: Sequence[IndexRow],
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> list[int]:
        """Add items: `vectors` [n, D] unit vectors, their `rows` and optional `thumbnails`.

        Returns their ids. When it returns the update is durable (journalled and fsynced) and
        searches see it. `JournalWriteError`: it could not be saved, nothing changed.
        """
        vectors = checked_addition(vectors, rows, thumbnails, self.dim)
        with self._write_mutex:
            successor = self._successor
            if successor is None:
                return self._add_locked(vectors, rows, thumbnails)
        return successor.add(vectors, rows, thumbnails)

    def _add_locked(
        self,
        vectors: np.ndarray,
        rows: Sequence[IndexRow],
        thumbnails: Sequence[bytes | None] | None,
    ) -> list[int]:
        self._check_writable()
        first = self._items.next_id
        ids = list(range(first, first + len(vectors)))
        record = Record(
            self._items.seq + 1,
            "add",
            ids,
            vectors,
            [{"key": r.key, "caption": r.caption, "url": _url(r), "meta": r.meta} for r in rows],
            list(thumbnails) if thumbnails is not None else [],
        )
        self._commit(record)
        return ids

    def delete(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Delete items `ids`; returns (deleted, not found). Durable when it returns."""
        wanted = list(dict.fromkeys(int(i) for i in ids))
        with self._write_mutex:
            successor = self._successor
            if successor is None:
                self._check_writable()
                rows, missing = self._items.rows_of(wanted)
                gone = set(missing)
                deleted = [i for i in wanted if i not in gone]
                if deleted:
                    self._commit(Record(self._items.seq + 1, "delete", deleted))
                return deleted, missing
        return successor.delete(wanted)

    @contextmanager
    def paused_writes(self) -> Iterator[Callable[[SearchIndex], None]]:
        """Hold updates while the index is loaded again; the function it yields hands this
        version's writes over to the new one (updates that were waiting go to it)."""
        with self._write_mutex:

            def hand_over(successor: SearchIndex) -> None:
                self._successor = successor
                self.read_only_reason = "replaced by a newer version of the same index"
                if self._journal is not None:
                    self._journal.close()
                    self._journal = None
                if self._writer is not None:
                    self._writer.release()
                    self._writer = None

            yield hand_over

    def compact(self) -> dict[str, Any]:
        """Write a snapshot with every update applied and no deleted row, empty the journal,
        and serve from it; returns `describe()`. Updates go on meanwhile (see compaction.py)."""
        with self._compaction:
            compact(self)
        return self.describe()

    def _check_writable(self) -> None:
        if self._journal is None:
            raise IndexReadOnlyError(
                f"index {self.directory.name!r} is read-only here: {self.read_only_reason}"
            )

    def _commit(self, record: Record) -> None:
        """Journal `record` (durable), then apply it for searches. Under `_write_mutex`."""
        assert self._journal is not None
        self._journal.append(record)
        with self._lock.exclusive():
            _apply(record, self._items, self._searcher, self.attributes)
        limit = self.compact_journal_bytes
        if limit is not None and self._journal.bytes >= limit:
            self._compact_in_background()

    def _compact_in_background(self) -> None:
        if self._compactor is not None and self._compactor.is_alive():
            return

        def run() -> None:
            try:
                self.compact()
            except Exception:
                log.exception("compaction of %s failed; the journal keeps every update", self)

        self._compactor = threading.Thread(target=run, name="duet-compaction", daemon=True)
        self._compactor.start()

    def _rows_locked(self, ids: set[int]) -> dict[int, IndexRow]:
        """Metadata of live items `ids`: added ones from memory, the snapshot's from SQLite."""
        found: dict[int, IndexRow] = {}
        stored = []
        for item_id in ids:
            added = self._items.added.get(item_id)
            if added is not None:
                found[item_id] = IndexRow(added.key, added.caption, added.meta, added.url)
            elif self._items.row_of(item_id) is not None:
                stored.append(item_id)
        return found | self._stored_rows(stored)

    def _stored_rows(self, ids: list[int]) -> dict[int, IndexRow]:
        if not ids:
            return {}
        rows: list[tuple[int, str, str, str, str]] = []
        ordered = sorted(ids)
        with self._db_lock:
            for start in range(0, len(ordered), SQL_VARIABLES_PER_QUERY):
                chunk = ordered[start : start + SQL_VARIABLES_PER_QUERY]
                rows += self._db.execute(
                    "SELECT id, key, caption, url, meta FROM items "
                    f"WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
        return {
            i: IndexRow(key, caption, read_meta(meta), url) for i, key, caption, url, meta in rows
        }

    def thumbnail_of(self, item_id: int) -> bytes | None:
        """Item `item_id`'s thumbnail; None when it has none or is not a live item."""
        with self._lock.shared():
            added = self._items.added.get(item_id)
            if added is not None:
                return added.thumbnail
            row = self._items.row_of(item_id)
            if row is None or row >= self._items.snapshot_rows or self._snapshot_thumbnails is None:
                return None
            return self._snapshot_thumbnails.get(row)

    def adopt(self, fresh: SearchIndex) -> None:
        """Serve from `fresh` (the same index loaded again after a compaction) from now on;
        closes what this one had open. Under `_write_mutex`."""
        with self._lock.exclusive():
            old = (self._db, self._snapshot_thumbnails, self._journal, self._writer)
            self.manifest = fresh.manifest
            self._searcher, self._items = fresh._searcher, fresh._items
            self.attributes = fresh.attributes
            with self._mask_lock:
                self._mask_cache.clear()  # masks of the old rows
            self._db, self._snapshot_thumbnails = fresh._db, fresh._snapshot_thumbnails
            self._journal, self._writer = fresh._journal, fresh._writer
        db, thumbnails, journal, writer = old
        with self._db_lock:
            db.close()
        if thumbnails is not None:
            thumbnails.close()
        if journal is not None:
            journal.close()
        if writer is not None:
            writer.release()

    def close(self) -> None:
        with self._db_lock:
            self._db.close()
        if self._snapshot_thumbnails is not None:
            self._snapshot_thumbnails.close()
        if self._journal is not None:
            self._journal.close()
        if self._writer is not None:
            self._writer.release()

    def __repr__(self) -> str:
        return f"SearchIndex({str(self.directory)!r})"


class ItemThumbnails:
    """An index's thumbnails by item id (the snapshot's and those of added items)."""

    def __init__(self, index: SearchIndex, reader: ThumbnailReader) -> None:
        self._index = index
        self.media_type = reader.media_type

    def get(self, item_id: int) -> bytes | None:
        return self._index.thumbnail_of(item_id)


class ReadWriteLock:
    """Many readers or one writer; a waiting writer goes before readers that arrive after it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


MASK_CACHE_ENTRIES = 8
"""Filter masks kept per index (one byte per row each: 8 MB at 1M rows)."""
SQL_VARIABLES_PER_QUERY = 900  # below SQLite's historical limit of 999 bound parameters


def read_meta(text: str) -> dict[str, Any]:
    """A row's stored JSON metadata, with NaN and infinities (Python's json writes them, as an
    img2dataset JSON may hold them) read as null: answers must be JSON every client parses."""
    meta: dict[str, Any] = json.loads(text, parse_constant=lambda _: None)
    return meta


def _hit(row_id: int, score: float, row: IndexRow) -> Hit:
    return Hit(row_id, row.key, score, row.caption, row.meta, row.url)


def _writer_lock(directory: Path, writable: bool | None) -> tuple[WriterLock | None, str | None]:
    """This process's write lock on the index, or None and why not."""
    if writable is False:
        return None, "opened read-only"
    reason = None
    if not os.access(directory, os.W_OK) or not os.access(directory.parent, os.W_OK):
        reason = f"its directory {directory.name!r} is not writable by this process"
    else:
        try:
            writer = WriterLock(directory.parent / f".{directory.name}.lock")
        except IndexReadOnlyError as exc:
            reason = str(exc)
        else:
            remove_stale(directory)  # staging left by a compaction that was killed
            return writer, None
    if writable:
        raise IndexReadOnlyError(f"index {directory} cannot be written: {reason}")
    return None, reason


def _apply(
    record: Record, items: ItemTable, searcher: VectorSearcher, attributes: AttributeColumns
) -> None:
    """One journal record applied to the rows, the vectors and the filter columns."""
    items.apply(record, searcher)
    if record.op == "add":
        attributes.append(
            [row["meta"] if isinstance(row["meta"], dict) else {} for row in record.rows]
        )


def _item_table(directory: Path, manifest: dict[str, Any], rows: int) -> ItemTable:
    path = directory / IDS_FILE
    ids = np.load(path, allow_pickle=False) if path.is_file() else np.arange(rows, dtype=np.int64)
    if ids.shape != (rows,) or (rows > 1 and not (np.diff(ids) > 0).all()):
        raise IndexLoadError(f"{path}: expected {rows} increasing item ids")
    next_id = int(manifest.get("next_id", rows))
    if rows and next_id <= int(ids[-1]):
        raise IndexLoadError(f"{directory}: next_id {next_id} is not above the last item id")
    return ItemTable(ids, next_id, int(manifest.get("journal_seq", 0)))


def _replay(
    directory: Path,
    items: ItemTable,
    searcher: VectorSearcher,
    attributes: AttributeColumns,
    *,
    writable: bool,
) -> Journal | None:
    """Apply the journal's records after the snapshot; the open journal when writable."""
    path = directory / JOURNAL_FILE
    records, valid_bytes = read_records(path)
    applied = 0
    for _, record in records:
        if record.seq > items.seq:
            _apply(record, items, searcher, attributes)
            applied += 1
    if applied:
        log.info("%s: applied %d journalled updates to the snapshot", directory, applied)
    return Journal(path, valid_bytes) if writable else None


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


def _read_vectors(path: Path, mmap: bool, random_reads: bool = False) -> np.ndarray:
    """`vectors.npy`, memory-mapped or read. `random_reads` (the on-disk tier, mapped): the
    kernel is told the map is read at random places, so a re-rank's row reads its own pages
    from disk and not the readahead window around it, which evicted the lists (at 10M x 512
    in a 2 GB memory cgroup: p50 21 ms with it, 1.7 s without; docs/benchmarks.md)."""
    if not path.is_file():
        raise IndexLoadError(f"{path} not found")
    try:
        vectors = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # numpy's errors for a bad header or size
        raise IndexLoadError(f"{path} is not a readable .npy array: {exc}") from exc
    if random_reads and isinstance(vectors, np.memmap):
        vectors._mmap.madvise(mmap_module.MADV_RANDOM)  # type: ignore[attr-defined]
    if (
        vectors.ndim != 2
        or vectors.dtype not in (np.float32, np.float16)
        or not vectors.flags.c_contiguous
    ):
        raise IndexLoadError(
            f"{path} holds a {vectors.dtype} array of shape {vectors.shape}; "
            "expected C-ordered float32 (on disk: float16) [N, D]"
        )
    return vectors


def _read_faiss(directory: Path, mmap: bool, on_disk: bool = False) -> faiss.Index:
    path = directory / FAISS_FILE
    if not path.is_file():
        raise IndexLoadError(f"{path} not found")
    # IO_FLAG_MMAP_IFC maps the codes of HNSW's storage and of IVF's inverted lists, plain or
    # fast-scan (IO_FLAG_MMAP maps only plain IVF lists); graph and coarse quantizer are read.
    try:
        if on_disk:
            return read_ondisk_index(path)
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
    metas = (read_meta(meta) for (meta,) in db.execute("SELECT meta FROM items ORDER BY id"))
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
