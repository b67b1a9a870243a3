"""Vector search: which FAISS index suits N vectors of dimension D; building and searching it.

    flat    exact inner product over the stored vectors: no build, no approximation; search
            reads every vector, so it suits up to ~`AUTO_FLAT_MAX_COUNT` vectors
    hnsw    `HNSW{M},SQ8`: a graph over 8-bit scalar-quantised vectors (D bytes each + the graph's
            2·M neighbour ids); fast and accurate, the graph lives in memory
    ivfpq   `IVF{nlist},PQ{m}x4fs`: k-means cells of product-quantised codes, m/2 bytes each
            (4-bit codes searched with FAISS' SIMD "fast scan"; `PQ{m}x8` for 8 bits), the
            smallest in memory, for the largest sets
    ivfpq on disk
            `IVF{nlist},PQ{m}` (8-bit codes) whose inverted lists live in a file
            (serve/indexing/ondisk.py), built block by block and merged on disk, searched
            memory-mapped: for indices larger than memory; `auto` from `AUTO_ON_DISK_MIN_COUNT`

Both approximate types re-rank k × rerank_factor candidates (at most MAX_RERANK_CANDIDATES)
exactly against the stored vectors, so compressed codes only have to get the right rows into the
candidate list; unless the spec fixes it, the build raises the factor until the recall it
measures reaches the spec's target (serve/indexing/rerank_tuning.py). Knobs left
as None are derived from N; the defaults were tuned with `bench/index.py` (docs/benchmarks.md).
Everything here works on numpy arrays (in memory or memory-mapped); files and metadata are
`serve/indexing/index.py`'s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from serve.indexing.delta import AppendedRows, StoredRows, empty_lists_copy, lists_on_disk
from serve.indexing.filtered_search import search_allowed

log = logging.getLogger(__name__)

AUTO, FLAT, HNSW, IVFPQ = "auto", "flat", "hnsw", "ivfpq"
INDEX_TYPES = (AUTO, FLAT, HNSW, IVFPQ)
AUTO_FLAT_MAX_COUNT = 50_000
"""`auto` builds flat below this many vectors: exact search is then a few ms per query."""
AUTO_HNSW_MAX_COUNT = 1_000_000
"""`auto` builds hnsw below this many vectors, ivfpq from here on: at 1M (D = 128) IVF-PQ + re-rank
searched 2.5x faster batched and 2.4x one at a time at recall@10 0.986 (HNSW 0.997), built in a
sixth of the time, and its index is a ninth of the size (docs/benchmarks.md)."""
AUTO_ON_DISK_MIN_COUNT = 10_000_000
"""`auto` puts ivfpq's inverted lists on disk from this many vectors: FAISS's guidance is to
compress from 10M vectors per server; below it `on_disk=True` asks for it."""
RECALL_K = 10
MAX_RERANK_CANDIDATES = 10_000
"""Candidates re-scored per query at most: k x rerank_factor is clamped to it, so a search reads
at most this many stored rows per query (5 MB at D = 128 float32) whatever k and the factor."""
RERANK_BLOCK_ROWS = 1 << 16
"""Candidate rows gathered at once ([queries, k', D]): 32 MB at D = 128 float32; queries are
searched and re-ranked in chunks of RERANK_BLOCK_ROWS // k' (at least one)."""
EXACT_BLOCK_ROWS = 1 << 18  # float16 rows widened to float32 at a time by `exact_knn`


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexSpec:
    """What the user asks for; every None knob is derived from the number of vectors."""

    index_type: str = AUTO
    """auto | flat | hnsw | ivfpq; auto chooses by size (see the module docstring)."""
    hnsw_m: int | None = None
    """hnsw: graph neighbours per node (default 32)."""
    ef_construction: int | None = None
    """hnsw: candidate list while building (default 80)."""
    ef_search: int | None = None
    """hnsw: candidate list while searching (default 128, 256 from 1M vectors)."""
    nlist: int | None = None
    """ivfpq: k-means cells (default ~4·sqrt(N), a power of two, at most N/39)."""
    pq_m: int | None = None
    """ivfpq: sub-quantisers; must divide D (default D/2: 2-dimensional sub-vectors)."""
    pq_nbits: int | None = None
    """ivfpq: bits per sub-quantiser code (default 4, FAISS' fast-scan kernels; on disk 8)."""
    on_disk: bool | None = None
    """ivfpq: inverted lists in a file, built in blocks (None: from AUTO_ON_DISK_MIN_COUNT)."""
    nprobe: int | None = None
    """ivfpq: cells searched per query (default nlist/128, at least 32)."""
    rerank_factor: int | None = None
    """approximate types: candidates re-scored exactly = k x this. Given, it is used as it is;
    None: from the plan's default (hnsw 2, ivfpq 20), raised at build time until the measured
    recall@10 reaches `recall_target` (serve/indexing/rerank_tuning.py)."""
    recall_target: float = 0.95
    """recall@10 (image and text queries) the build raises a default rerank factor to reach."""
    recall_queries: int = 1000
    """stored vectors used as queries to measure recall@10 after the build (0: skip)."""
    seed: int = 0
    """seed of the training and recall samples."""

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(
                f"index_type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}"
            )
        knobs = ("hnsw_m", "ef_construction", "ef_search", "nlist", "pq_m", "nprobe")
        for name in (*knobs, "rerank_factor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")
        if self.pq_nbits is not None and not 1 <= self.pq_nbits <= 16:
            raise ValueError(f"pq_nbits must be in 1..16, got {self.pq_nbits}")
        if self.on_disk and self.index_type not in (AUTO, IVFPQ):
            raise ValueError(f"on_disk is an ivfpq tier, not {self.index_type}")
        if self.on_disk and self.pq_nbits not in (None, 8):
            raise ValueError(f"on_disk stores 8-bit codes, got pq_nbits={self.pq_nbits}")
        if self.recall_queries < 0:
            raise ValueError(f"recall_queries must be >= 0, got {self.recall_queries}")


@dataclass(frozen=True, slots=True)
class IndexPlan:
    """A resolved spec: what `write_index` builds and what the manifest records."""

    index_type: str
    factory: str | None = None
    """FAISS index_factory string; None for flat."""
    search_params: dict[str, int] = field(default_factory=dict)
    """FAISS ParameterSpace settings applied at load (efSearch, nprobe)."""
    rerank_factor: int = 1
    train_size: int = 0
    ef_construction: int | None = None
    on_disk: bool = False
    """ivfpq: inverted lists in `index.ivfdata` (serve/indexing/ondisk.py)."""

    def manifest(self) -> dict[str, Any]:
        return {
            "index_type": self.index_type,
            "on_disk": self.on_disk,
            "factory": self.factory,
            "search_params": self.search_params,
            "rerank_factor": self.rerank_factor,
        }


def plan_index(spec: IndexSpec, count: int, dim: int) -> IndexPlan:
    """Resolve `spec` for `count` vectors of dimension `dim`; ValueError when it cannot be built."""
    index_type = spec.index_type
    if index_type == AUTO and spec.on_disk:
        index_type = IVFPQ
    if index_type == AUTO:
        if count < AUTO_FLAT_MAX_COUNT:
            index_type = FLAT
        else:
            index_type = HNSW if count < AUTO_HNSW_MAX_COUNT else IVFPQ
    if index_type == FLAT:
        return IndexPlan(FLAT)
    if index_type == HNSW:
        return _plan_hnsw(spec, count)
    return _plan_ivfpq(spec, count, dim)


def _plan_hnsw(spec: IndexSpec, count: int) -> IndexPlan:
    m = spec.hnsw_m or 32
    ef_search = spec.ef_search or (128 if count < 1_000_000 else 256)
    return IndexPlan(
        HNSW,
        factory=f"HNSW{m},SQ8",
        search_params={"efSearch": ef_search},
        rerank_factor=spec.rerank_factor or 2,
        train_size=min(count, 65_536),  # SQ8 learns a min/max per dimension: a sample suffices
        ef_construction=spec.ef_construction or 80,
    )


def _plan_ivfpq(spec: IndexSpec, count: int, dim: int) -> IndexPlan:
    max_nlist = max(1, count // 39)  # FAISS' k-means wants >= 39 training points per cell
    nlist = spec.nlist or min(max_nlist, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count)))))
    # 4-bit codes of 2-dimensional sub-vectors (D/4 bytes): as small as 8-bit codes of 4
    # dimensions, but FAISS trains them in a second where those take minutes, and scans them
    # with SIMD; at 100k vectors (D = 128) they also found more of the true top 10.
    # On disk (8-bit codes, no fast-scan): 4-dimensional sub-vectors, D/4 bytes as well; at
    # D = 512 that is the PQ128 LAION-5B was served with.
    on_disk = spec.on_disk if spec.on_disk is not None else count >= AUTO_ON_DISK_MIN_COUNT
    nbits = spec.pq_nbits or (8 if on_disk else 4)
    sub_dim = 4 if on_disk else 2
    pq_m = spec.pq_m or max(d for d in range(1, max(1, dim // sub_dim) + 1) if dim % d == 0)
    if dim % pq_m:
        raise ValueError(f"pq_m must divide the dimension {dim}, got {pq_m}")
    if count < max(nlist, 2**nbits):
        raise ValueError(
            f"ivfpq with nlist={nlist}, pq_nbits={nbits} needs at least "
            f"{max(nlist, 2**nbits)} vectors, got {count}; use --index-type flat"
        )
    nprobe = min(nlist, spec.nprobe or max(32, nlist // 128))
    codes = f"PQ{pq_m}x4fs" if nbits == 4 and not on_disk else f"PQ{pq_m}x{nbits}"
    return IndexPlan(
        IVFPQ,
        factory=f"IVF{nlist},{codes}",
        search_params={"nprobe": nprobe},
        rerank_factor=spec.rerank_factor or 20,
        # k-means costs train_size x nlist x D per iteration: FAISS warns below 39 points per
        # cell, and the PQ codebooks' own k-means want as many per code
        train_size=min(count, 40 * max(nlist, 2**nbits)),
        on_disk=on_disk,
    )


def build_faiss_index(plan: IndexPlan, vectors: np.ndarray) -> faiss.Index | None:
    """The approximate index of `plan` over `vectors`, trained on a sample; None for flat."""
    if plan.factory is None:  # flat: exact search needs no index
        return None
    index = trained_index(plan, vectors)
    index.add(vectors)
    return index


def trained_index(plan: IndexPlan, vectors: np.ndarray) -> faiss.Index:
    """The empty index of `plan` (not flat), trained on a sample of `vectors` (read row by row
    from a memory-mapped array: the sample is all that is held)."""
    assert plan.factory is not None
    index = faiss.index_factory(vectors.shape[1], plan.factory, faiss.METRIC_INNER_PRODUCT)
    inner: Any = faiss.downcast_index(index)  # the concrete type, whose knobs we set
    if plan.ef_construction is not None:
        inner.hnsw.efConstruction = plan.ef_construction
    if hasattr(inner, "do_polysemous_training"):
        # Polysemous codes speed up Hamming pre-filtering, which the search does not use; their
        # training costs minutes (137 s of a 139 s IVF-PQ build at 20k vectors).
        inner.do_polysemous_training = False
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(vectors), min(len(vectors), plan.train_size), replace=False))
    index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    return index


def exact_knn(queries: np.ndarray, vectors: StoredRows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k by inner product (scores, ids [Q, k]) over `vectors` [N, D], float32 or the
    on-disk tier's float16 or `AppendedRows` (widened block by block, so a memory-mapped file
    is never copied whole into memory)."""
    if isinstance(vectors, np.ndarray) and vectors.dtype == np.float32:
        return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), EXACT_BLOCK_ROWS):
        block = np.asarray(vectors[start : start + EXACT_BLOCK_ROWS], dtype=np.float32)
        scores, ids = faiss.knn(queries, block, min(k, len(block)), faiss.METRIC_INNER_PRODUCT)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, order, axis=1)
        best_ids = np.take_along_axis(best_ids, order, axis=1)
    return best_scores, best_ids


def measure_recall(searcher: VectorSearcher, queries: int, *, seed: int = 0) -> dict[str, Any]:
    """recall@10 of `searcher` against exact search, over `queries` stored vectors as queries.

    Each query is a stored vector, which both searches find first; it is left out of both lists,
    so the figure is about its 10 nearest *other* vectors and not inflated by the self-match.
    """
    vectors = searcher.vectors
    n = min(queries, len(vectors))
    if searcher.exact or n == 0 or len(vectors) <= RECALL_K:
        return {"recall_at_10": 1.0 if searcher.exact else None, "recall_queries": 0}
    ids = sample_rows(len(vectors), n, seed)
    sample = np.ascontiguousarray(vectors[ids], dtype=np.float32)
    _, exact = exact_knn(sample, vectors, RECALL_K + 1)
    recall = recall_without_self(ids, exact, searcher.search(sample, RECALL_K + 1)[1])
    log.info("recall@%d = %.4f over %d sampled queries", RECALL_K, recall, n)
    return {"recall_at_10": recall, "recall_queries": n}


def sample_rows(count: int, n: int, seed: int) -> np.ndarray:
    """`n` distinct rows of `count`, sorted: the stored vectors used as recall queries."""
    return np.sort(np.random.default_rng(seed).choice(count, n, replace=False))


def recall_without_self(ids: np.ndarray, exact: np.ndarray, found: np.ndarray) -> float:
    """recall@10 of `found` against `exact` (ids [n, 11] each) for stored rows `ids` [n] as
    queries, each query's own row left out of both lists."""
    hits = 0
    for query_id, truth, approx in zip(ids, exact, found, strict=True):
        truth_set = set(truth[truth != query_id][:RECALL_K].tolist())
        hits += len(truth_set & set(approx[approx != query_id][:RECALL_K].tolist()))
    return round(hits / (len(ids) * RECALL_K), 4)


def recall_of(exact: np.ndarray, found: np.ndarray) -> float:
    """Share of the exact ids [Q, k] that `found` [Q, k] holds, per query, averaged."""
    hits = sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(exact, found, strict=True))
    return round(hits / exact.size, 4)


def measure_query_recall(searcher: VectorSearcher, queries: np.ndarray) -> float | None:
    """recall@10 of `searcher` against exact search for `queries` [Q, D] that are not stored
    vectors (captions through the text tower: what users send); None without queries.

    Image-to-image recall asks for neighbours of a stored point, which sit in its own cell; a
    text query lands between cells (the modality gap), so this is the figure users get.
    """
    if len(queries) == 0 or len(searcher.vectors) == 0:
        return None
    if searcher.exact:
        return 1.0
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(RECALL_K, len(searcher.vectors))
    _, exact = exact_knn(queries, searcher.vectors, k)
    recall = recall_of(exact, searcher.search(queries, k)[1])
    log.info("text-query recall@%d = %.4f over %d captions", k, recall, len(queries))
    return recall


class VectorSearcher:
    """Top-k row ids by inner product: exact, or approximate candidates re-scored exactly.

    Read-only after construction (search parameters are set once, here), so one instance serves
    many threads: FAISS CPU searches and numpy reads do not modify shared state.

    `threads`: OpenMP threads per search (None: FAISS's default, every core). OpenMP keeps this
    setting per thread, and a thread that did not set it gets the default, so it is applied on
    the searching thread at every search, not once at load.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        index: faiss.Index | None,
        *,
        search_params: dict[str, int] | None = None,
        rerank_factor: int = 1,
        threads: int | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        # [N, D] float32 (on disk: float16), in memory or memory-mapped; the on-disk tier's
        # after an add: `AppendedRows`, the mapped rows and then the added ones
        self.vectors: StoredRows = vectors
        self._buffer: np.ndarray | None = None  # [capacity, D] once rows have been added
        self._index = index
        self.lists_on_disk = lists_on_disk(index)
        self._delta: faiss.Index | None = None  # on-disk tier: the added rows' lists
        self.rerank_factor = rerank_factor
        self.threads = threads
        self.search_params = dict(search_params or {})
        for name, value in self.search_params.items():
            if index is None:
                raise ValueError(f"search parameter {name} given for an exact (flat) index")
            faiss.ParameterSpace().set_index_parameter(index, name, value)

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Queries [Q, D] -> (scores, ids), each [Q, k], best first; id -1 where fewer found.

        `allowed`: bool [N], the rows that may be returned (None: all); min(k, allowed rows)
        come back per query (see `search_allowed`).

        The thread's OpenMP setting is put back afterwards: torch imported first shares FAISS's
        OpenMP runtime, so leaving it at `threads` would also leave every later forward pass on
        this thread (the batcher's) with that many threads.
        """
        if self.threads is None:
            return self._search_any(queries, k, allowed)
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.threads)  # this thread's setting; ~1 us
        try:
            return self._search_any(queries, k, allowed)
        finally:
            faiss.omp_set_num_threads(previous)

    def _search_any(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if allowed is None:
            return self.search_all(queries, k)
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != (len(self.vectors),):
            raise ValueError(f"allowed must be bool [{len(self.vectors)}], got {allowed.shape}")
        return search_allowed(self, queries, k, allowed)

    def search_all(
        self, queries: np.ndarray, k: int, params: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k over every row; `params`: FAISS search parameters of the approximate index
        (filtered search passes its ID selector and a raised efSearch / nprobe here)."""
        if self._index is None:
            return exact_knn(queries, self.vectors, k)
        k_candidates = rerank_candidates(k, self.rerank_factor, len(self.vectors))
        indices = [self._index] if self._delta is None else [self._index, self._delta]
        scores = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        chunk_queries = max(1, RERANK_BLOCK_ROWS // (k_candidates * len(indices)))
        for start in range(0, len(queries), chunk_queries):
            chunk = slice(start, start + chunk_queries)
            # [chunk, k'], approximate order; `params` (filtered search): a selector, ef / nprobe.
            # The on-disk tier's added rows have lists of their own: both propose candidates.
            candidates = np.concatenate(
                [index.search(queries[chunk], k_candidates, params=params)[1] for index in indices],
                axis=1,
            )
            scores[chunk], ids[chunk] = _rerank(queries[chunk], candidates, self.vectors, k)
        return scores, ids

    @property
    def exact(self) -> bool:
        return self._index is None

    @property
    def deletes_in_index(self) -> bool:
        """IVF lists drop deleted rows themselves; exact and HNSW search need them masked out
        (an HNSW graph cannot lose a node without losing the paths through it), and so do
        lists on disk (their file is the snapshot's, and stays as it was written)."""
        return isinstance(self._index, faiss.IndexIVF) and not self.lists_on_disk

    @property
    def index(self) -> faiss.Index | None:
        """The approximate index (None for flat)."""
        return self._index

    def add(self, vectors: np.ndarray) -> None:
        """Append rows [n, D] (unit vectors) after the last; not safe beside a running search.

        Vectors live in a buffer with room to grow (doubling), so n single adds cost O(n) copies
        in all; a search holding the previous `self.vectors` keeps a valid view of it. Lists on
        disk keep the snapshot's mapped rows where they are (`_add_beside_disk`).
        """
        if self.lists_on_disk:
            self._add_beside_disk(vectors)
            return
        assert isinstance(self.vectors, np.ndarray)
        count = len(self.vectors)
        total = count + len(vectors)
        # the first add copies the loaded rows (a memory-mapped index is read into memory here)
        self._buffer = grown(self.vectors if self._buffer is None else self._buffer, count, vectors)
        if self._index is not None:
            if isinstance(self._index, faiss.IndexIVF):  # explicit ids: deletes removed some
                self._index.add_with_ids(vectors, np.arange(count, total, dtype=np.int64))
            else:
                assert self._index.ntotal == count, "an HNSW graph holds every row ever added"
                self._index.add(vectors)
        self.vectors = self._buffer[:total]

    def _add_beside_disk(self, vectors: np.ndarray) -> None:
        """Rows [n, D] added to the on-disk tier: into a growing buffer after the mapped rows,
        and into the delta (in-memory lists with the snapshot's training); see delta.py."""
        assert self._index is not None
        snapshot = self.vectors.snapshot if isinstance(self.vectors, AppendedRows) else self.vectors
        count, added = len(self.vectors), len(self.vectors) - len(snapshot)
        empty = np.empty((0, snapshot.shape[1]), np.float32)
        self._buffer = grown(empty if self._buffer is None else self._buffer, added, vectors)
        if self._delta is None:
            self._delta = empty_lists_copy(self._index)
            for name, value in self.search_params.items():
                faiss.ParameterSpace().set_index_parameter(self._delta, name, value)
        self._delta.add_with_ids(vectors, np.arange(count, count + len(vectors), dtype=np.int64))
        self.vectors = AppendedRows(snapshot, self._buffer[: added + len(vectors)])

    def remove(self, rows: np.ndarray) -> None:
        """Drop `rows` from an IVF index's lists (others: the caller masks them out)."""
        if self.deletes_in_index:
            assert self._index is not None
            self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(rows, dtype=np.int64)))


def grown(buffer: np.ndarray, count: int, new: np.ndarray) -> np.ndarray:
    """`buffer` with `new` written after its first `count` rows, reallocated (doubling, at
    least 1024 rows) when it has no room: n appends cost O(n) copies in all, and views of the
    first `count` rows stay valid. A read-only `buffer` (a loaded index's rows) is copied."""
    total = count + len(new)
    if len(buffer) < total or not buffer.flags.writeable:
        larger = np.empty((max(total, 2 * count, 1024), *buffer.shape[1:]), dtype=buffer.dtype)
        larger[:count] = buffer[:count]
        buffer = larger
    buffer[count:total] = new
    return buffer


def rerank_candidates(k: int, rerank_factor: int, count: int) -> int:
    """Candidates the approximate index proposes for a top k: k x rerank_factor, at least k,
    at most MAX_RERANK_CANDIDATES and the number of stored vectors."""
    return min(max(k, min(k * rerank_factor, MAX_RERANK_CANDIDATES)), count)


def _rerank(
    queries: np.ndarray, candidates: np.ndarray, vectors: StoredRows, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of the candidate ids [Q, k'] (-1 = none) against the stored vectors; top k."""
    found = candidates >= 0
    rows = vectors[np.where(found, candidates, 0).ravel()]  # [Q * k', D]; a memmap reads pages
    rows = rows.astype(np.float32, copy=False)  # the on-disk tier stores float16
    scores = np.einsum("qd,qcd->qc", queries, rows.reshape(*candidates.shape, -1))  # [Q, k']
    scores = np.where(found, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(candidates, order, axis=1), -1)
    if top_ids.shape[1] < k:  # fewer candidates than k: pad like FAISS does
        pad = k - top_ids.shape[1]
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_scores, top_ids
