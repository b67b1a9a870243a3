"""Compaction: a new snapshot with every journalled update applied, then an empty journal.

    1. under the write lock (a moment): note the last journal record S and its end offset, and
       take what the snapshot needs (live rows, their ids, added items, a copy of an IVF index);
    2. with updates going on: write the snapshot to a staging directory (common/atomic_dir.py):
       live vectors, their item ids, the FAISS index without deleted rows (IVF: the trained
       quantiser with the live rows added again; HNSW: a new graph, which is what clears its
       tombstones; flat: none), metadata, thumbnails, a manifest with `journal_seq` = S and the
       recall@10 measured on the new index;
    3. under the write lock again: copy the journal's records after S into the staging
       directory, swap it into place, and serve from it (loaded exactly as a restart would).

A kill before step 3's swap leaves the old directory and its whole journal (the staging
directory is removed by the next writer); after it, the new snapshot and the records after S.
So no acknowledged update is lost and none is applied twice or half.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from common.atomic_dir import replace_dir, staging_dir
from serve.indexing.delta import StoredRows, empty_lists_copy
from serve.indexing.filters import ATTRIBUTES_FILE, AttributeColumns
from serve.indexing.journal import JOURNAL_FILE
from serve.indexing.layout import (
    CREATE_ITEMS_TABLE,
    FAISS_FILE,
    IDS_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    VECTORS_FILE,
)
from serve.indexing.ondisk import fill_lists, write_half_vectors
from serve.indexing.thumbnails import THUMBNAILS_FILE, PackWriter
from serve.indexing.updates import AddedItem
from serve.indexing.vector_search import (
    HNSW,
    RECALL_K,
    IndexPlan,
    VectorSearcher,
    build_faiss_index,
    measure_recall,
)

if TYPE_CHECKING:
    from serve.indexing.index import SearchIndex

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Cut:
    """What step 1 takes: the state as of journal record `seq`."""

    seq: int
    journal_offset: int
    # [live, D]; the on-disk tier: every row's vectors (`rows` picks the live ones), read
    # block by block as the new snapshot is written, never whole
    vectors: StoredRows
    ids: np.ndarray  # [live]
    rows: np.ndarray  # [live] rows in the loaded index
    snapshot_rows: int
    added: dict[int, AddedItem]
    next_id: int
    faiss_index: faiss.Index | None  # IVF: a copy to re-add the live rows to (on disk: empty)
    updated_recall: float | None  # recall@10 of the index as updated, before compaction
    attributes: AttributeColumns  # the filter columns of `rows`


def compact(index: SearchIndex) -> None:
    """Compact `index` (which must be writable); see the module docstring."""
    start = time.perf_counter()
    cut = _take_cut(index)
    staged = staging_dir(index.directory, "compact")
    try:
        _write_snapshot(index, cut, staged)
        with index._write_mutex:
            index._check_writable()  # not handed over to a reloaded version meanwhile
            assert index._journal is not None
            (staged / JOURNAL_FILE).write_bytes(index._journal.tail_bytes(cut.journal_offset))
            replace_dir(staged, index.directory)
            fresh = type(index).load(
                index.directory, writable=True, mmap=index.mmap, threads=index._searcher.threads
            )
            index.adopt(fresh)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log.info(
        "compacted %s: %d items, journal records up to %d folded in, in %.1f s",
        index.directory,
        len(cut.ids),
        cut.seq,
        time.perf_counter() - start,
    )


def _take_cut(index: SearchIndex) -> _Cut:
    with index._write_mutex:
        index._check_writable()
        assert index._journal is not None
        items, searcher = index._items, index._searcher
        alive = items.alive_mask()
        rows = np.flatnonzero(alive) if alive is not None else np.arange(items.rows)
        faiss_index = searcher.index
        vectors: StoredRows
        copy: faiss.Index | None = None
        recall: float | None = None
        if searcher.lists_on_disk:
            # larger than memory: the rows are read as the snapshot is written; the recall of
            # the updated index would take an exact search of every row under the write lock
            assert faiss_index is not None
            vectors, copy = searcher.vectors, empty_lists_copy(faiss_index)
        else:
            vectors = np.ascontiguousarray(searcher.vectors[rows])
            if isinstance(faiss_index, faiss.IndexIVF):
                copy = faiss.clone_index(faiss_index)
            recall = updated_recall(index, vectors, items.ids[rows])
        return _Cut(
            seq=items.seq,
            journal_offset=index._journal.bytes,
            vectors=vectors,
            ids=items.ids[rows].copy(),
            rows=rows,
            snapshot_rows=items.snapshot_rows,
            added=dict(items.added),
            next_id=items.next_id,
            faiss_index=copy,
            updated_recall=recall,
            attributes=index.attributes.take(rows),
        )


def updated_recall(
    index: SearchIndex, live_vectors: np.ndarray, live_ids: np.ndarray, queries: int = 1000
) -> float | None:
    """recall@10 of `index` as updated (adds in its lists or graph, deletes dropped or masked)
    against exact search over its live items, as `measure_recall` does for a build: stored
    vectors as queries, each left out of both lists. Under the write lock: nothing changes."""
    if index._searcher.exact:
        return 1.0
    n = min(queries, len(live_vectors))
    if n == 0 or len(live_vectors) <= RECALL_K:
        return None
    picked = np.sort(np.random.default_rng(0).choice(len(live_vectors), n, replace=False))
    sample = np.ascontiguousarray(live_vectors[picked])
    _, exact = faiss.knn(sample, live_vectors, RECALL_K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    with index._lock.shared():
        _, rows = index._search_rows(sample, RECALL_K + 1)
        found = np.where(rows >= 0, index._items.ids[np.maximum(rows, 0)], -1)
    hits = 0
    for query_id, truth, approx in zip(live_ids[picked], live_ids[exact], found, strict=True):
        truth_set = set(truth[truth != query_id][:RECALL_K].tolist())
        hits += len(truth_set & set(approx[approx != query_id][:RECALL_K].tolist()))
    return round(hits / (n * RECALL_K), 4)


def _write_snapshot(index: SearchIndex, cut: _Cut, staged: Path) -> None:
    np.save(staged / IDS_FILE, cut.ids)
    manifest: dict[str, Any] = dict(index.manifest)
    build_start = time.perf_counter()
    rebuilt: faiss.Index | None
    if manifest.get("on_disk"):
        vectors, rebuilt = _rebuild_ondisk(cut, staged)
    else:
        assert isinstance(cut.vectors, np.ndarray)
        vectors = cut.vectors
        np.save(staged / VECTORS_FILE, vectors)
        rebuilt = _rebuild_faiss(manifest, cut, vectors)
    if rebuilt is not None:
        faiss.write_index(rebuilt, str(staged / FAISS_FILE))
    seconds = round(time.perf_counter() - build_start, 3)
    searcher = VectorSearcher(
        vectors,
        rebuilt,
        search_params=manifest.get("search_params"),
        rerank_factor=int(manifest.get("rerank_factor", 1)),
    )
    recall = measure_recall(searcher, int(manifest.get("recall_queries") or 1000))
    _write_metadata(index, cut, staged / METADATA_FILE)
    cut.attributes.save(staged / ATTRIBUTES_FILE)
    if index._snapshot_thumbnails is not None:
        _write_thumbnails(index, cut, staged / THUMBNAILS_FILE)
    manifest.update(
        count=len(cut.ids),
        next_id=cut.next_id,
        journal_seq=cut.seq,
        compacted=datetime.now(UTC).isoformat(timespec="seconds"),
        index_build_seconds=seconds,
        recall_at_10_before_compaction=cut.updated_recall,
        **recall,
    )
    (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _rebuild_ondisk(cut: _Cut, staged: Path) -> tuple[np.ndarray, faiss.Index]:
    """The on-disk tier's snapshot of the live rows, block by block: their float16 vectors
    (memory-mapped, returned) and the cut's empty lists copy with them added, merged into the
    staged `index.ivfdata` (returned, searching it). Memory: one block of rows at a time."""
    vectors = write_half_vectors(staged / VECTORS_FILE, cut.vectors, cut.rows)
    assert cut.faiss_index is not None
    fill_lists(cut.faiss_index, vectors, staged)
    return vectors, cut.faiss_index


def _rebuild_faiss(manifest: dict[str, Any], cut: _Cut, vectors: np.ndarray) -> faiss.Index | None:
    """The FAISS index over the live rows `vectors`: IVF keeps its training, HNSW is built
    anew."""
    if cut.faiss_index is not None:  # IVF: same cells and codebooks, the live rows re-added
        cut.faiss_index.reset()
        cut.faiss_index.add(vectors)
        return cut.faiss_index
    if manifest["index_type"] != HNSW:
        return None
    plan = IndexPlan(
        HNSW,
        factory=manifest["factory"],
        search_params=manifest.get("search_params") or {},
        rerank_factor=int(manifest.get("rerank_factor", 2)),
        train_size=min(len(vectors), 65_536),
        ef_construction=int(manifest.get("ef_construction") or 80),
    )
    return build_faiss_index(plan, vectors)


def _write_metadata(index: SearchIndex, cut: _Cut, path: Path) -> None:
    """The snapshot's live rows copied from the old store, then the added items."""
    old = index.directory / METADATA_FILE
    snapshot_ids = cut.ids[cut.rows < cut.snapshot_rows]
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = OFF")  # a staging file: fsynced before the swap
        db.execute("PRAGMA synchronous = OFF")
        db.execute(CREATE_ITEMS_TABLE)
        db.execute("CREATE TEMP TABLE live (id INTEGER PRIMARY KEY)")
        db.executemany("INSERT INTO live VALUES (?)", ((int(i),) for i in snapshot_ids))
        db.execute("ATTACH DATABASE ? AS old", (str(old),))
        db.execute(
            "INSERT INTO items SELECT id, key, caption, url, meta FROM old.items "
            "WHERE id IN (SELECT id FROM live)"
        )
        added_ids = cut.ids[cut.rows >= cut.snapshot_rows]
        db.executemany(
            "INSERT INTO items VALUES (?, ?, ?, ?, ?)",
            (
                (int(i), a.key, a.caption, a.url, json.dumps(a.meta))
                for i in added_ids
                for a in (cut.added[int(i)],)
            ),
        )
    db.close()


def _write_thumbnails(index: SearchIndex, cut: _Cut, path: Path) -> None:
    reader = index._snapshot_thumbnails
    assert reader is not None
    writer = PackWriter(path)
    try:
        for item_id, row in zip(cut.ids, cut.rows, strict=True):
            if row < cut.snapshot_rows:
                data = reader.get(int(row))
            else:
                data = cut.added[int(item_id)].thumbnail
            writer.add(data or b"")
    except BaseException:
        writer.abort()
        raise
    writer.close()
