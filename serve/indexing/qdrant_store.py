"""Qdrant as the vector store (`DUET_VECTOR_STORE=qdrant`): `QdrantIndex`, one served index per
collection, on a Qdrant server (`DUET_QDRANT_URL`) or embedded on a local path (`DUET_QDRANT_PATH`).

A collection written by `python -m serve.indexing.to_qdrant` holds everything a replica needs,
so replicas share nothing but the Qdrant cluster:

    points        id = Duet's item id; vector = the unit embedding (distance Dot = cosine);
                  payload {"key", "caption", "url", "meta": {...}, "thumbnail": base64}
                  ("thumbnail" only where the item has one)
    metadata      duet_manifest   the index's manifest (model, build_id, thumbnails, the
                                  filterable fields and their kinds)
                  duet_next_id    the next item id an add takes (raised before the points
                                  are written: a crash skips ids, never reuses them)
                  duet_export     how far the export got (the manifest is written last: the
                                  service refuses a collection without it)
                  duet_writer     the replica that may add and delete items

Durability is Qdrant's: an update is answered once Qdrant has applied it (`wait=True`), with no
journal of Duet's; compaction is Qdrant's optimiser's. One replica writes: it claims the
collection when it loads (`DUET_INDEX_WRITES`, the last to claim wins), and before each update
checks that the claim is still its own, else it answers 409 read_only from then on.

Every call is bounded by `DUET_QDRANT_TIMEOUT_S`; a server that cannot be reached, does not
answer in time or answers 5xx is a `VectorStoreUnavailable` (HTTP 503 with Retry-After). The
service still starts when the server is down, and reads the collection once it answers.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import models

from serve.indexing.filters import Filter, parse_filter
from serve.indexing.index import Hit, IndexLoadError, IndexRow
from serve.indexing.journal import IndexReadOnlyError
from serve.indexing.qdrant_collection import (
    MANIFEST_KEY,
    NEXT_ID_KEY,
    ROW_FIELDS,
    THUMBNAIL_FIELD,
    WRITER_KEY,
    QdrantConfig,
    QdrantConnection,
    payload_row,
    row_payload,
)
from serve.indexing.qdrant_filters import qdrant_filter
from serve.indexing.store import VectorStoreUnavailable, checked_addition
from serve.indexing.thumbnails import MEDIA_TYPES, ThumbnailSpec

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Collection:
    """What the service reads of a collection once: its manifest and the filterable fields."""

    manifest: dict[str, Any]
    fields: dict[str, str]
    boolean_fields: frozenset[str]


class QdrantIndex:
    """A served index in a Qdrant collection (the module docstring); see `ServedIndex`."""

    def __init__(
        self,
        connection: QdrantConnection,
        collection: str,
        *,
        expected_dim: int,
        writable: bool | None = None,
    ) -> None:
        self.collection = collection
        # a server is a network call; embedded Qdrant tests filters in Python point by point
        self.searches_in_threadpool = True
        self._connection = connection
        self._dim = expected_dim
        self._loaded: _Collection | None = None
        self._load_lock = threading.Lock()
        self._count = 0
        self._wants_writes = writable is not False
        self._writer_id = uuid.uuid4().hex
        self._lost_writes: str | None = None if self._wants_writes else "opened read-only"
        self._write_mutex = threading.Lock()
        self._successor: QdrantIndex | None = None
        connection.acquire()
        try:
            self._loaded = self._read_collection()
        except VectorStoreUnavailable as exc:  # it is read when the server answers
            log.warning("collection %r not read yet: %s", collection, exc)
        except BaseException:
            connection.release()
            raise

    # --- what the routes read -------------------------------------------------------------

    @property
    def count(self) -> int:
        """Live items as last read from Qdrant (load, `describe`, this replica's updates)."""
        return self._count

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def build_id(self) -> str:
        manifest = self._ensure_loaded().manifest
        return str(manifest.get("build_id") or manifest.get("created") or "0")

    @property
    def thumbnail_spec(self) -> ThumbnailSpec | None:
        info = self._ensure_loaded().manifest.get("thumbnails")
        if not isinstance(info, dict):
            return None
        return ThumbnailSpec(
            format=info["format"],
            max_side_px=int(info.get("max_side_px", 256)),
            quality=int(info.get("quality", 80)),
        )

    @property
    def thumbnails(self) -> QdrantThumbnails | None:
        spec = self.thumbnail_spec
        return None if spec is None else QdrantThumbnails(self, MEDIA_TYPES[spec.format])

    @property
    def writable(self) -> bool:
        return self._lost_writes is None

    @property
    def read_only_reason(self) -> str | None:
        return self._lost_writes

    def search(
        self, queries: np.ndarray, k: int, *, where: Filter | None = None
    ) -> list[list[Hit]]:
        """Queries [Q, D] unit vectors -> per query the best min(k, matching) hits."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        loaded = self._ensure_loaded()
        query_filter = None
        if where is not None:
            query_filter = qdrant_filter(where, loaded.fields, loaded.boolean_fields)
        requests = [
            models.QueryRequest(
                query=query.tolist(), filter=query_filter, limit=k, with_payload=ROW_FIELDS
            )
            for query in queries
        ]
        with self._connection.call("search") as client:
            answers = client.query_batch_points(self.collection, requests)
        return [
            [_hit(point) for point in answer.points if point.payload is not None]
            for answer in answers
        ]

    def filter(self, raw: Any, *, max_conditions: int, max_values: int) -> Filter:
        """A client's filter -> `Filter`; FilterError when this collection cannot apply it."""
        where = parse_filter(raw, max_conditions=max_conditions, max_values=max_values)
        loaded = self._ensure_loaded()
        qdrant_filter(where, loaded.fields, loaded.boolean_fields)  # checks it translates
        return where

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored unit vectors [len(ids), D]; KeyError naming an id that is not there."""
        wanted = [int(i) for i in ids]
        with self._connection.call("read vectors") as client:
            points = client.retrieve(self.collection, wanted, with_payload=False, with_vectors=True)
        found = {int(p.id): p.vector for p in points}
        for item_id in wanted:
            if item_id not in found:
                raise KeyError(f"no item with id {item_id} in collection {self.collection!r}")
        return np.asarray([found[i] for i in wanted], dtype=np.float32).reshape(-1, self.dim)

    def rows(self, ids: Sequence[int]) -> dict[int, IndexRow]:
        wanted = list(dict.fromkeys(int(i) for i in ids))
        if not wanted:
            return {}
        with self._connection.call("read items") as client:
            points = client.retrieve(self.collection, wanted, with_payload=ROW_FIELDS)
        return {int(p.id): payload_row(p.payload) for p in points}

    def get(self, item_id: int) -> IndexRow:
        found = self.rows([item_id])
        if item_id not in found:
            raise KeyError(f"no item with id {item_id} in this index")
        return found[item_id]

    def thumbnail_of(self, item_id: int) -> bytes | None:
        with self._connection.call("read a thumbnail") as client:
            points = client.retrieve(self.collection, [item_id], with_payload=[THUMBNAIL_FIELD])
        text = (points[0].payload or {}).get(THUMBNAIL_FIELD) if points else None
        return base64.b64decode(text) if isinstance(text, str) else None

    def describe(self) -> dict[str, Any]:
        """As `SearchIndex.describe`, the count read from Qdrant now."""
        loaded = self._ensure_loaded()
        manifest = loaded.manifest
        with self._connection.call("describe") as client:
            info = client.get_collection(self.collection)
        self._count = int(info.points_count or 0)
        return {
            "count": self._count,
            "dim": self.dim,
            "index_type": "qdrant",
            "metric": "inner_product",
            "recall_at_10": None,
            "model": manifest.get("model", {}).get("name"),
            "created": manifest.get("created"),
            "directory": None,
            "collection": self.collection,
            "vector_store": "qdrant",
            "mmap": False,
            "thumbnails": (manifest.get("thumbnails") or {}).get("format"),
            "filterable": loaded.fields,
            "writable": self.writable,
            "read_only_reason": self.read_only_reason,
            "deleted_pending": 0,
            "journal_bytes": None,
        }

    # --- updates ------------------------------------------------------------------------------

    def add(
        self,
        vectors: np.ndarray,
        rows: Sequence[IndexRow],
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> list[int]:
        """Add items; returns their ids once Qdrant has applied the write."""
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
        first = self._check_writer()
        ids = list(range(first, first + len(vectors)))
        images = thumbnails if thumbnails is not None else [None] * len(rows)
        points = [
            models.PointStruct(id=i, vector=vector.tolist(), payload=row_payload(row, image))
            for i, vector, row, image in zip(ids, vectors, rows, images, strict=True)
        ]
        with self._connection.call("add items") as client:
            # the ids are taken before the points exist: a crash between skips them, and a
            # later add never hands them out again
            client.update_collection(self.collection, metadata={NEXT_ID_KEY: ids[-1] + 1})
            client.upsert(self.collection, points, wait=True)
        self._count += len(ids)
        return ids

    def delete(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Delete items `ids`; returns (deleted, not found), once Qdrant has applied it."""
        wanted = list(dict.fromkeys(int(i) for i in ids))
        with self._write_mutex:
            successor = self._successor
            if successor is None:
                self._check_writer()
                with self._connection.call("delete items") as client:
                    present = {
                        int(p.id)
                        for p in client.retrieve(self.collection, wanted, with_payload=False)
                    }
                    deleted = [i for i in wanted if i in present]
                    if deleted:
                        selector = models.PointIdsList(points=list(deleted))
                        client.delete(self.collection, selector, wait=True)
                self._count -= len(deleted)
                return deleted, [i for i in wanted if i not in present]
        return successor.delete(wanted)

    @contextmanager
    def paused_writes(self) -> Iterator[Callable[[Any], None]]:
        """Hold updates while the collection is read again; hand them over to the new one."""
        with self._write_mutex:

            def hand_over(successor: Any) -> None:
                self._successor = successor
                self._lost_writes = "replaced by a newer version of the same index"

            yield hand_over

    def compact(self) -> dict[str, Any]:
        """Nothing to do: Qdrant's optimiser drops deleted points itself."""
        return self.describe()

    def close(self) -> None:
        self._connection.release()

    def __repr__(self) -> str:
        return f"QdrantIndex({self.collection!r} at {self._connection.config.where})"

    # --- the collection -----------------------------------------------------------------------

    def _ensure_loaded(self) -> _Collection:
        """The collection's manifest, read on first use (and claimed for writes if wanted)."""
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._load_lock:
            if self._loaded is None:
                try:
                    self._loaded = self._read_collection()
                except IndexLoadError as exc:  # the server is back with no usable collection
                    raise VectorStoreUnavailable(str(exc)) from exc
            return self._loaded

    def _read_collection(self) -> _Collection:
        with self._connection.call("read the collection") as client:
            if not client.collection_exists(self.collection):
                raise IndexLoadError(
                    f"no collection {self.collection!r} in Qdrant: write one with "
                    "`python -m serve.indexing.to_qdrant`"
                )
            info = client.get_collection(self.collection)
        metadata = info.config.metadata or {}
        manifest = metadata.get(MANIFEST_KEY)  # written last, with the export's `complete`
        if not isinstance(manifest, dict):
            raise IndexLoadError(
                f"collection {self.collection!r} holds no complete Duet index (its export did "
                "not finish): run `python -m serve.indexing.to_qdrant` again to finish it"
            )
        _check_vectors(self.collection, info.config.params.vectors, self._dim)
        self._count = int(info.points_count or 0)
        if self._wants_writes:
            self._claim_writes()
        filterable = manifest.get("filterable") or {}
        log.info("collection %r: %d items of dim %d", self.collection, self._count, self._dim)
        return _Collection(
            manifest,
            {str(name): str(kind) for name, kind in filterable.items()},
            frozenset(manifest.get("boolean_fields") or ()),
        )

    def _claim_writes(self) -> None:
        claim = {
            "id": self._writer_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with self._connection.call("claim the collection's writes") as client:
            client.update_collection(self.collection, metadata={WRITER_KEY: claim})

    def _check_writer(self) -> int:
        """The next free item id, after checking that this replica still writes (409 if not)."""
        if self._lost_writes is not None:
            raise IndexReadOnlyError(
                f"collection {self.collection!r} is read-only here: {self._lost_writes}"
            )
        self._ensure_loaded()
        with self._connection.call("check the writer") as client:
            metadata = client.get_collection(self.collection).config.metadata or {}
        writer = metadata.get(WRITER_KEY) or {}
        if writer.get("id") != self._writer_id:
            self._lost_writes = (
                f"replica {writer.get('host')} (pid {writer.get('pid')}) writes it since "
                f"{writer.get('since')}"
            )
            raise IndexReadOnlyError(
                f"collection {self.collection!r} is read-only here: {self._lost_writes}"
            )
        return int(metadata.get(NEXT_ID_KEY, 0))


class QdrantThumbnails:
    """A collection's thumbnails by item id (from the points' payload)."""

    def __init__(self, index: QdrantIndex, media_type: str) -> None:
        self._index = index
        self.media_type = media_type

    def get(self, item_id: int) -> bytes | None:
        return self._index.thumbnail_of(item_id)


def _hit(point: models.ScoredPoint) -> Hit:
    row = payload_row(point.payload)
    return Hit(int(point.id), row.key, float(point.score), row.caption, row.meta, row.url)


def _check_vectors(collection: str, params: Any, dim: int) -> None:
    if not isinstance(params, models.VectorParams):
        raise IndexLoadError(f"collection {collection!r} has named vectors; Duet writes one")
    if params.size != dim:
        raise IndexLoadError(
            f"collection {collection!r} has vectors of dim {params.size} but the model's "
            f"embed_dim is {dim}; write it again with this model's index"
        )
    if params.distance not in (models.Distance.DOT, models.Distance.COSINE):
        raise IndexLoadError(
            f"collection {collection!r} uses distance {params.distance}; Duet's scores are "
            "cosine similarities (Dot on unit vectors, or Cosine)"
        )


def qdrant_loader(
    config: QdrantConfig, *, expected_dim: int, writable: bool | None
) -> Callable[[Path | str], QdrantIndex]:
    """A loader for `IndexRegistry`: collection name -> `QdrantIndex`, one shared client."""
    connection = QdrantConnection(config)

    def load(collection: Path | str) -> QdrantIndex:
        return QdrantIndex(
            connection, str(collection), expected_dim=expected_dim, writable=writable
        )

    return load
