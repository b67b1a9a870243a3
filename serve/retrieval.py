"""Search steps shared by /search and clip-retrieval's /knn-service: query vectors, top-k, dedup.

Plain functions over a `ServedIndex` (any vector store) and numpy arrays; the routes run them
in the threadpool.
"""

from __future__ import annotations

import numpy as np

from serve.indexing.filters import Filter
from serve.indexing.index import Hit
from serve.indexing.store import ServedIndex

# clip-retrieval's back end drops results at cosine >= 0.94 to a better one when deduplicating.
CLIP_RETRIEVAL_DEDUP_THRESHOLD = 0.94


class QueryError(ValueError):
    """A query vector that cannot be searched with (wrong length, not finite, zero)."""


def normalized_query(values: list[float], dim: int) -> np.ndarray:
    """A client's embedding -> [1, dim] unit vector; `QueryError` says what is wrong with it."""
    vector = np.asarray(values, dtype=np.float64)
    if vector.shape != (dim,):
        raise QueryError(f"the embedding has {vector.size} values; this index needs {dim}")
    if not np.isfinite(vector).all():
        raise QueryError("the embedding has values that are not finite (NaN or infinity)")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not np.isfinite(norm):
        raise QueryError("the embedding has zero (or overflowing) length; it cannot be normalised")
    return (vector / norm).astype(np.float32)[None, :]


def search(
    index: ServedIndex,
    query: np.ndarray,
    k: int,
    *,
    dedup_threshold: float | None = None,
    overfetch: int = 4,
    exclude_id: int | None = None,
    where: Filter | None = None,
) -> list[Hit]:
    """The best `k` hits for one query [1, D], best first; `where`: only rows matching it.

    `exclude_id` leaves out that row ("more like this" should not return the item itself).
    With `dedup_threshold`, `k x overfetch` candidates are read and a hit is dropped when its
    cosine similarity to a better kept hit is at least the threshold.
    """
    fetch = k * overfetch if dedup_threshold is not None else k
    fetch += exclude_id is not None
    (hits,) = index.search(query, max(1, fetch), where=where)  # it returns min(k, matching)
    hits = [hit for hit in hits if hit.id != exclude_id]
    if dedup_threshold is not None and len(hits) > 1:
        vectors = index.vectors([hit.id for hit in hits])  # [H, D] unit vectors
        hits = [hits[i] for i in keep_distinct(vectors, dedup_threshold)]
    return hits[:k]


def keep_distinct(vectors: np.ndarray, threshold: float) -> list[int]:
    """Rows of `vectors` [N, D] (best first) to keep: each below `threshold` to all kept before."""
    kept: list[int] = []
    for i in range(len(vectors)):
        if not kept or float((vectors[kept] @ vectors[i]).max()) < threshold:
            kept.append(i)
    return kept
