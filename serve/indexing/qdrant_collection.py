"""A Qdrant collection as Duet writes it, and the connection to it.

The collection's layout (its points' payload, the keys of its metadata) is shared by the writer
(`serve/indexing/to_qdrant.py`) and the reader (`serve/indexing/qdrant_store.py`, whose
docstring describes it); `QdrantConnection` is the one place a Qdrant call's failure becomes
`VectorStoreUnavailable` (HTTP 503) and the one client a process keeps.
"""

from __future__ import annotations

import base64
import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from qdrant_client import QdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from serve.indexing.index import IndexRow
from serve.indexing.store import VectorStoreUnavailable

log = logging.getLogger(__name__)

MANIFEST_KEY, NEXT_ID_KEY, EXPORT_KEY, WRITER_KEY = (
    "duet_manifest",
    "duet_next_id",
    "duet_export",
    "duet_writer",
)
MEMORY = ":memory:"
"""`QdrantConfig.path` of an embedded store held in memory only (benchmarks)."""
ROW_FIELDS = ["key", "caption", "url", "meta"]
THUMBNAIL_FIELD = "thumbnail"
UNAVAILABLE_STATUSES = frozenset({404, 408, 429, 500, 502, 503, 504})
"""Qdrant answers that mean "not now": 404 is a collection gone (being recreated)."""


@dataclass(frozen=True, slots=True)
class QdrantConfig:
    """Where the collections are: a server `url` or an embedded store's `path` (one of them)."""

    url: str | None = None
    path: Path | None = None
    api_key: str | None = None
    timeout_s: float = 5.0

    def client(self) -> QdrantClient:
        if self.url is not None:
            # no version check: it would call the server here, unbounded by our timeout
            return QdrantClient(
                url=self.url,
                api_key=self.api_key,
                timeout=max(1, math.ceil(self.timeout_s)),
                check_compatibility=False,
            )
        assert self.path is not None, "a QdrantConfig needs a url or a path"
        if str(self.path) == MEMORY:
            return QdrantClient(location=MEMORY)
        return QdrantClient(path=str(self.path))

    @property
    def where(self) -> str:
        return self.url if self.url is not None else f"embedded store {self.path}"


class QdrantConnection:
    """One client shared by a process's collections (an embedded store admits one client),
    opened on first use and closed with the last index that uses it."""

    def __init__(self, config: QdrantConfig, client: QdrantClient | None = None) -> None:
        """`client`: one already open (an in-memory store's, which no other client can
        reach); this connection then never closes it."""
        self.config = config
        self.remote = config.url is not None
        self._client: QdrantClient | None = client
        self._owns_client = client is None
        self._users = 0
        self._lock = threading.Lock()
        # embedded mode runs Qdrant's engine in this process, not made for concurrent calls
        self._embedded_calls = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._client is None:
                self._client = self.config.client()
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            client, close = self._client, self._users == 0 and self._owns_client
            if close:
                self._client = None
        if close and client is not None:
            client.close()

    @contextmanager
    def call(self, what: str) -> Iterator[QdrantClient]:
        """The client, for one operation; unreachable / slow / 5xx -> VectorStoreUnavailable."""
        client = self._client
        if client is None:
            raise VectorStoreUnavailable(f"{what}: the Qdrant client is closed")
        try:
            with nullcontext() if self.remote else self._embedded_calls:
                yield client
        except (ResponseHandlingException, httpx.HTTPError) as exc:
            cause = getattr(exc, "source", exc)
            log.warning("%s: Qdrant at %s did not answer: %r", what, self.config.where, cause)
            raise VectorStoreUnavailable(
                f"{what}: the vector store (Qdrant) did not answer ({type(cause).__name__}); "
                "retry later"
            ) from exc
        except UnexpectedResponse as exc:
            if exc.status_code not in UNAVAILABLE_STATUSES:
                raise
            log.warning("%s: Qdrant at %s answered %s", what, self.config.where, exc)
            raise VectorStoreUnavailable(
                f"{what}: the vector store (Qdrant) answered {exc.status_code} "
                f"{exc.reason_phrase}; retry later"
            ) from exc


def row_payload(row: IndexRow, thumbnail: bytes | None) -> dict[str, Any]:
    """A point's payload: the row, and its thumbnail as base64 where it has one."""
    payload: dict[str, Any] = {
        "key": row.key,
        "caption": row.caption,
        "url": row.url,
        "meta": row.meta,
    }
    if thumbnail:
        payload[THUMBNAIL_FIELD] = base64.b64encode(thumbnail).decode("ascii")
    return payload


def payload_row(payload: dict[str, Any] | None) -> IndexRow:
    payload = payload or {}
    meta = payload.get("meta")
    return IndexRow(
        str(payload.get("key", "")),
        str(payload.get("caption", "")),
        meta if isinstance(meta, dict) else {},
        str(payload.get("url") or ""),
    )
