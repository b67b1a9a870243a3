"""Top-k among the allowed rows only (a metadata filter's mask, less deleted rows).

    exact (flat), and any index when the allowed rows are few: score the allowed rows only.
        Few allowed (< DENSE_FRACTION): gather them block by block and score them; many: score
        every row of a block and drop the rest, cheaper than gathering most of the rows.
    approximate (hnsw, ivfpq), when enough rows are allowed: the FAISS search itself skips the
        rest through an `IDSelectorBitmap` in its search parameters, with efSearch / nprobe
        raised gently as fewer rows are allowed (a graph walk or a probed cell then holds fewer
        allowed rows), then the usual exact re-rank. A query that still gets fewer than
        min(k, allowed) results is answered exactly.

When ANN gives way to exact search, and how far efSearch / nprobe grow, was measured with
`bench/filters.py` (docs/benchmarks.md, "Filtered search").
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

if TYPE_CHECKING:
    from serve.indexing.delta import StoredRows
    from serve.indexing.vector_search import VectorSearcher

EXACT_MAX_FRACTION = 0.02
"""Approximate indices search exactly when at most this fraction of the rows is allowed: at 1M
vectors and 1% allowed, HNSW with the selector found recall@10 0.90-0.91 (efSearch x1 to x4)
and IVF-PQ 0.955-0.985 (nprobe x1 to x4); exact search over the allowed rows finds all, and
with their vectors kept (`_allowed_vectors`) costs less than either."""
EXACT_MAX_ROWS = 2048
"""... or when at most this many rows are allowed (scoring them is then cheaper than a search)."""
DENSE_FRACTION = 0.25
"""Exact search scores every row of a block (masking the rest) from this allowed fraction up."""
MAX_EFFORT_FACTOR = 4
"""efSearch / nprobe grow as (1 / allowed fraction) ** EFFORT_EXPONENT, at most this many times."""
EFFORT_EXPONENT = 0.25
"""At 100k vectors, unchanged efSearch / nprobe kept recall@10 >= 0.987 down to 3% allowed (the
walk still visits thousands of rows, the probed cells hold thousands): a gentle growth suffices.
At 1M and 10% allowed: HNSW recall 0.993 with x1 and x1.8 (1.2x and 1.6x the unfiltered time),
IVF-PQ 1.000 either way; the growth is kept for the selectivities between 2% and 10%."""
GATHER_CACHE_BYTES = 64 << 20
"""Vectors of the allowed rows kept with cached masks, all together (see `_allowed_vectors`)."""
SCORE_BLOCK_ELEMS = 1 << 22
"""Exact search scores [Q, rows] blocks of at most this many elements (16 MiB of float32)..."""
GATHER_BLOCK_BYTES = 32 << 20
"""... and gathers at most this many bytes of allowed rows' vectors at a time."""


@dataclass(slots=True)
class _Prepared:
    """What searches derive from a mask: its count, FAISS bitmap and allowed row list."""

    count: int
    bits: np.ndarray | None = None  # [ceil(N / 8)] uint8, bit i of byte i // 8 = row i
    rows: np.ndarray | None = None  # [count] int64
    gathered: np.ndarray | None = None  # [count, D] float32: the allowed rows' vectors

    def bitmap(self, allowed: np.ndarray) -> np.ndarray:
        if self.bits is None:
            self.bits = np.packbits(allowed, bitorder="little")
        return self.bits

    def allowed_rows(self, allowed: np.ndarray) -> np.ndarray:
        if self.rows is None:
            self.rows = np.flatnonzero(allowed)
        return self.rows


PREPARED_ENTRIES = 16
_prepared_masks: dict[int, tuple[weakref.ref[np.ndarray], _Prepared]] = {}
_prepared_lock = threading.Lock()


def _prepare(allowed: np.ndarray) -> _Prepared:
    """The mask's count (and, lazily, bitmap and rows); kept while a read-only mask lives, so
    a filter whose mask is cached (SearchIndex) pays for them once (~0.5 ms at 1M rows)."""
    if allowed.flags.writeable:  # may change after this search: nothing kept
        return _Prepared(int(np.count_nonzero(allowed)))
    with _prepared_lock:
        entry = _prepared_masks.get(id(allowed))
        if entry is not None and entry[0]() is allowed:
            return entry[1]
        prepared = _Prepared(int(np.count_nonzero(allowed)))
        for key in [key for key, (ref, _) in _prepared_masks.items() if ref() is None]:
            del _prepared_masks[key]  # masks no longer alive
        if len(_prepared_masks) >= PREPARED_ENTRIES:
            del _prepared_masks[next(iter(_prepared_masks))]  # the oldest
        _prepared_masks[id(allowed)] = (weakref.ref(allowed), prepared)
        return prepared


def _allowed_vectors(vectors: StoredRows, rows: np.ndarray, prepared: _Prepared) -> np.ndarray:
    """vectors[rows] [count, D]; kept with a cached mask while all kept ones together stay
    within GATHER_CACHE_BYTES: gathering scattered rows is most of an exact search's time
    (1.3 ms for 1% of 1M rows of D = 128, scoring them 0.1 ms)."""
    if prepared.gathered is not None:
        return prepared.gathered
    gathered = np.asarray(vectors[rows])  # not np.take: `AppendedRows` reads only these rows
    with _prepared_lock:
        if any(entry is prepared for _, entry in _prepared_masks.values()):
            kept = sum(
                entry.gathered.nbytes
                for ref, entry in _prepared_masks.values()
                if entry.gathered is not None and ref() is not None
            )
            if kept + gathered.nbytes <= GATHER_CACHE_BYTES:
                prepared.gathered = gathered
    return gathered


def search_allowed(
    searcher: VectorSearcher, queries: np.ndarray, k: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) [Q, k] best first among rows where `allowed` [N] is True; -1 / -inf pad.

    A read-only `allowed` is taken to stay unchanged: what is derived from it is kept."""
    total = len(allowed)
    prepared = _prepare(allowed)
    count = prepared.count
    if count == total:
        return searcher.search_all(queries, k)
    if count == 0:
        return _empty(len(queries), k)
    fraction = count / total
    if searcher.exact or count <= EXACT_MAX_ROWS or fraction <= EXACT_MAX_FRACTION:
        return _exact(searcher.vectors, queries, k, allowed, prepared)
    bits = prepared.bitmap(allowed)
    selector = faiss.IDSelectorBitmap(total, faiss.swig_ptr(bits))
    scores, ids = searcher.search_all(queries, k, _params(searcher, selector, fraction))
    wanted = min(k, count)
    short = (ids[:, :wanted] < 0).any(axis=1)  # [Q]: the walk / the cells held too few
    if short.any():
        scores[short], ids[short] = _exact(searcher.vectors, queries[short], k, allowed, prepared)
    return scores, ids


def _params(searcher: VectorSearcher, selector: faiss.IDSelector, fraction: float) -> object:
    """Search parameters with the selector and the effort raised for `fraction` allowed."""
    factor = min(MAX_EFFORT_FACTOR, fraction**-EFFORT_EXPONENT)
    assert searcher.index is not None
    index: Any = faiss.downcast_index(searcher.index)
    api: Any = faiss  # its type stubs lack the search parameter classes
    if isinstance(index, faiss.IndexHNSW):
        ef = searcher.search_params.get("efSearch", index.hnsw.efSearch)
        return api.SearchParametersHNSW(sel=selector, efSearch=math.ceil(ef * factor))
    ivf: Any = faiss.extract_index_ivf(index)
    nprobe = min(ivf.nlist, math.ceil(searcher.search_params.get("nprobe", ivf.nprobe) * factor))
    return api.SearchParametersIVF(sel=selector, nprobe=nprobe)


def exact_allowed(
    vectors: StoredRows, queries: np.ndarray, k: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product among the rows where `allowed` is True."""
    return _exact(vectors, queries, k, allowed, _prepare(allowed))


def _exact(
    vectors: StoredRows, queries: np.ndarray, k: int, allowed: np.ndarray, prepared: _Prepared
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k among the allowed rows, block by block."""
    count = prepared.count
    row_bytes = vectors.shape[1] * vectors.itemsize
    block_rows = max(
        1024, min(SCORE_BLOCK_ELEMS // max(1, len(queries)), GATHER_BLOCK_BYTES // row_bytes)
    )
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    if count / len(allowed) >= DENSE_FRACTION:
        for start in range(0, len(vectors), block_rows):
            rows = np.arange(start, min(start + block_rows, len(vectors)))
            scores = queries @ np.asarray(vectors[start : rows[-1] + 1]).T  # [Q, rows]
            scores[:, ~allowed[start : rows[-1] + 1]] = -np.inf
            parts.append(_top(scores, rows, k))
    elif count <= block_rows:  # one block: its vectors may be kept for the next search
        rows = prepared.allowed_rows(allowed)
        parts.append(_top(queries @ _allowed_vectors(vectors, rows, prepared).T, rows, k))
    else:
        allowed_rows = prepared.allowed_rows(allowed)
        for start in range(0, count, block_rows):
            rows = allowed_rows[start : start + block_rows]
            parts.append(_top(queries @ np.asarray(vectors[rows]).T, rows, k))
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    top_scores, top_ids = _top(scores, ids, k)
    top_ids = np.where(np.isfinite(top_scores), top_ids, -1)
    if top_ids.shape[1] < k:  # fewer allowed rows than k: pad like FAISS does
        pad = ((0, 0), (0, k - top_ids.shape[1]))
        top_ids = np.pad(top_ids, pad, constant_values=-1)
        top_scores = np.pad(top_scores, pad, constant_values=-np.inf)
    return top_scores.astype(np.float32), top_ids.astype(np.int64)


def _top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best min(k, columns) of `scores` [Q, C] per query, best first, with their ids
    (`ids`: [C] shared by every query, or [Q, C])."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        ids = ids[part] if ids.ndim == 1 else np.take_along_axis(ids, part, axis=1)
    elif ids.ndim == 1:
        ids = np.broadcast_to(ids, scores.shape)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _empty(queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((queries, k), -np.inf, np.float32), np.full((queries, k), -1, np.int64)
