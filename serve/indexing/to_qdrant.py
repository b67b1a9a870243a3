"""`python -m serve.indexing.to_qdrant`: write a built Duet index into a Qdrant collection.

    python -m serve.indexing.to_qdrant runs/index --collection laion --url http://qdrant:6333
    python -m serve.indexing.to_qdrant runs/index --collection laion --path runs/qdrant

Every live item (the snapshot with its journal applied) becomes a point: id = item id, its unit
vector, and the payload serve/indexing/qdrant_store.py describes (caption, key, url, metadata,
the thumbnail as base64), so that the service (`DUET_VECTOR_STORE=qdrant`) needs nothing but
the collection. Batches are upserted in id order and the collection's metadata records the last
id written after each: a run that was stopped picks up after it (points are upserted by id, so
a batch written twice is written the same). The service refuses the collection until the run
has finished: payload indexes on the filterable fields, the manifest, then `complete`.

A collection that holds another index (another build, or the same one with other updates) is
left alone unless `--recreate` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from qdrant_client import QdrantClient, models

from serve.indexing.filters import NUMBER, STRING
from serve.indexing.index import IndexRow, SearchIndex
from serve.indexing.qdrant_collection import (
    EXPORT_KEY,
    MANIFEST_KEY,
    NEXT_ID_KEY,
    QdrantConfig,
    row_payload,
)
from serve.indexing.qdrant_filters import META

DEFAULT_BATCH_ROWS = 512
PAYLOAD_SCHEMAS = {
    STRING: models.PayloadSchemaType.KEYWORD,
    NUMBER: models.PayloadSchemaType.FLOAT,
}


def export_index(
    index_dir: Path,
    collection: str,
    client: QdrantClient,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    recreate: bool = False,
    on_disk: bool = False,
    progress: TextIO | None = None,
) -> int:
    """Write index `index_dir` into `collection`; returns the items written by this run."""
    index = SearchIndex.load(index_dir, writable=False, mmap=True)
    try:
        source = _source_id(index)
        done = _prepare(client, collection, index, source, recreate, on_disk)
        if done is None:
            _say(progress, f"collection {collection!r} already holds this index: nothing to do")
            return 0
        written = _write_points(client, collection, index, done, batch_rows, progress)
        _finish(client, collection, index, done)
        _say(progress, f"collection {collection!r}: {index.count} items, complete")
        return written
    finally:
        index.close()


@dataclass(slots=True)
class _Progress:
    """How far an export got, kept in the collection's metadata after each batch."""

    source: str
    through: int = -1  # the last item id written
    booleans: set[str] = field(default_factory=set)  # number fields seen holding true/false
    complete: bool = False

    @classmethod
    def of(cls, export: dict[str, Any]) -> _Progress:
        return cls(
            export["source"],
            int(export.get("done_through", -1)),
            set(export.get("boolean_fields") or ()),
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "done_through": self.through,
            "boolean_fields": sorted(self.booleans),
            "complete": self.complete,
        }


def _source_id(index: SearchIndex) -> str:
    """Names what is exported: the build and the updates applied to it."""
    return f"{index.build_id}:{index.next_id}:{index.count}"


def _prepare(
    client: QdrantClient,
    collection: str,
    index: SearchIndex,
    source: str,
    recreate: bool,
    on_disk: bool,
) -> _Progress | None:
    """Create the collection, or find how far an earlier run got; None when it is complete."""
    if client.collection_exists(collection):
        export = (client.get_collection(collection).config.metadata or {}).get(EXPORT_KEY) or {}
        if export.get("source") == source and not recreate:
            return None if export.get("complete") else _Progress.of(export)
        if not recreate:
            raise SystemExit(
                f"error: collection {collection!r} holds another index "
                f"({export.get('source', 'not written by Duet')}); pass --recreate to replace it"
            )
        client.delete_collection(collection)
    client.create_collection(
        collection,
        vectors_config=models.VectorParams(
            size=index.dim, distance=models.Distance.DOT, on_disk=on_disk
        ),
        on_disk_payload=True,  # captions, metadata and thumbnails stay out of RAM
        metadata={EXPORT_KEY: _Progress(source).metadata()},
    )
    return _Progress(source)


def _write_points(
    client: QdrantClient,
    collection: str,
    index: SearchIndex,
    done: _Progress,
    batch_rows: int,
    progress: TextIO | None,
) -> int:
    written, start = 0, time.perf_counter()
    numbers = {name for name, kind in index.attributes.fields().items() if kind == NUMBER}
    for ids, vectors, rows, thumbnails in index.live_items(batch_rows, after_id=done.through):
        if not len(ids):
            continue
        points = [
            models.PointStruct(id=int(i), vector=vector.tolist(), payload=row_payload(row, image))
            for i, vector, row, image in zip(ids, vectors, rows, thumbnails, strict=True)
        ]
        client.upsert(collection, points, wait=True)
        done.through = int(ids[-1])
        done.booleans |= {name for row in rows for name in _bool_keys(row) if name in numbers}
        client.update_collection(collection, metadata={EXPORT_KEY: done.metadata()})
        written += len(ids)
        rate = written / max(time.perf_counter() - start, 1e-9)
        _say(progress, f"exported {written} items (up to id {done.through}), {rate:.0f} items/s")
    return written


def _finish(client: QdrantClient, collection: str, index: SearchIndex, done: _Progress) -> None:
    """Payload indexes on the filterable fields, then the manifest, then `complete`."""
    fields = index.attributes.fields()
    booleans = sorted(done.booleans)
    with warnings.catch_warnings():  # embedded Qdrant says it has no use for them
        warnings.filterwarnings("ignore", "Payload indexes have no effect", UserWarning)
        for name, kind in fields.items():
            schema = models.PayloadSchemaType.BOOL if name in booleans else PAYLOAD_SCHEMAS[kind]
            client.create_payload_index(
                collection, f"{META}.{name}", field_schema=schema, wait=True
            )
    manifest = {**index.manifest, "filterable": fields, "boolean_fields": booleans}
    done.complete = True
    client.update_collection(
        collection,
        metadata={MANIFEST_KEY: manifest, NEXT_ID_KEY: index.next_id, EXPORT_KEY: done.metadata()},
    )


def _bool_keys(row: IndexRow) -> list[str]:
    return [name for name, value in row.meta.items() if isinstance(value, bool)]


def _say(progress: TextIO | None, message: str) -> None:
    if progress is not None:
        print(message, file=progress, flush=True)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve.indexing.to_qdrant", description=__doc__.splitlines()[0]
    )
    parser.add_argument("index_dir", type=Path, help="a built index (serve.build_index)")
    parser.add_argument("--collection", required=True, help="the Qdrant collection to write")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a Qdrant server, e.g. http://127.0.0.1:6333")
    where.add_argument("--path", type=Path, help="an embedded Qdrant store's directory")
    parser.add_argument(
        "--api-key", default=os.environ.get("DUET_QDRANT_API_KEY"), help="(DUET_QDRANT_API_KEY)"
    )
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per Qdrant call")
    parser.add_argument("--recreate", action="store_true", help="replace another index there")
    parser.add_argument("--on-disk", action="store_true", help="vectors on disk (memory-mapped)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.batch_rows < 1:
        print("error: --batch-rows must be at least 1", file=sys.stderr)
        return 2
    config = QdrantConfig(
        url=args.url, path=args.path, api_key=args.api_key, timeout_s=args.timeout_s
    )
    client = config.client()
    try:
        export_index(
            args.index_dir,
            args.collection,
            client,
            batch_rows=args.batch_rows,
            recreate=args.recreate,
            on_disk=args.on_disk,
            progress=sys.stderr,
        )
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
