"""`ServedIndex`: what the routes use of an index, whichever vector store holds it.

Two stores implement it (`DUET_VECTOR_STORE`):

    faiss    `SearchIndex` (serve/indexing/index.py): the index directory in this process, FAISS
             search, SQLite metadata, thumbnails beside them, updates journalled in the directory
    qdrant   `QdrantIndex` (serve/indexing/qdrant_store.py): a Qdrant collection (a server, or
             an embedded store on a local path) holds vectors, metadata and thumbnails; several
             service replicas may share it

The routes, `serve/retrieval.py` and `IndexRegistry` know only this protocol, so a search, a
filter, an item add or delete reads the same and answers the same whichever store serves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from serve.indexing.filters import Filter

if TYPE_CHECKING:
    from serve.indexing.index import Hit, IndexRow
    from serve.indexing.thumbnails import ThumbnailSpec


class VectorStoreUnavailable(RuntimeError):
    """The vector store could not be reached or did not answer in time; the request may be
    retried (HTTP 503 with Retry-After). Nothing of a refused update was acknowledged."""


def checked_addition(
    vectors: np.ndarray,
    rows: Sequence[IndexRow],
    thumbnails: Sequence[bytes | None] | None,
    dim: int,
) -> np.ndarray:
    """`vectors` as contiguous float32 [n >= 1, dim], after the checks every store's `add`
    makes of its arguments (ValueError naming what is wrong)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim or not len(vectors):
        raise ValueError(f"vectors must be [n >= 1, {dim}], got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors must be finite")
    if len(rows) != len(vectors) or (thumbnails is not None and len(thumbnails) != len(rows)):
        raise ValueError(f"{len(vectors)} vectors need as many rows (and thumbnails)")
    return vectors


class Thumbnails(Protocol):
    """An index's thumbnails by item id."""

    media_type: str

    def get(self, item_id: int) -> bytes | None: ...


class ServedIndex(Protocol):
    """A loaded index as requests use it; safe to share between threads."""

    @property
    def count(self) -> int:
        """Live items; never waits on the network (`/health` and `/metrics` read it)."""
        ...

    @property
    def dim(self) -> int: ...

    @property
    def build_id(self) -> str:
        """Names this build: a thumbnail URL carrying it never changes content."""
        ...

    @property
    def thumbnail_spec(self) -> ThumbnailSpec | None: ...

    @property
    def thumbnails(self) -> Thumbnails | None: ...

    @property
    def writable(self) -> bool: ...

    @property
    def read_only_reason(self) -> str | None: ...

    @property
    def searches_in_threadpool(self) -> bool:
        """Searches may take long out of the service's hands (a network call, an embedded
        engine): run them in the threadpool, not on the encoder's thread, so that a slow store
        never holds up encoding."""
        ...

    def search(
        self, queries: np.ndarray, k: int, *, where: Filter | None = None
    ) -> list[list[Hit]]: ...

    def filter(self, raw: Any, *, max_conditions: int, max_values: int) -> Filter: ...

    def vectors(self, ids: Sequence[int]) -> np.ndarray: ...

    def rows(self, ids: Sequence[int]) -> dict[int, IndexRow]: ...

    def get(self, item_id: int) -> IndexRow: ...

    def describe(self) -> dict[str, Any]: ...

    def add(
        self,
        vectors: np.ndarray,
        rows: Sequence[IndexRow],
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> list[int]: ...

    def delete(self, ids: Sequence[int]) -> tuple[list[int], list[int]]: ...

    def paused_writes(self) -> AbstractContextManager[Callable[[Any], None]]: ...

    def compact(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
