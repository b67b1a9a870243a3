"""Qdrant as the vector store, against qdrant-client's embedded mode: the exported collection
answers like FAISS's exact search (top-10 agreement, with and without filters), filters that
Qdrant cannot mean the same refuse clearly, the export resumes and never duplicates, updates
are visible and never reuse an id, one replica writes, and an unreachable server is
`VectorStoreUnavailable` within the timeout."""

from __future__ import annotations

import io
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient

from serve.indexing.filters import FilterError
from serve.indexing.index import IndexLoadError, IndexRow, SearchIndex, write_index
from serve.indexing.journal import IndexReadOnlyError
from serve.indexing.qdrant_collection import QdrantConfig, QdrantConnection
from serve.indexing.qdrant_store import QdrantIndex
from serve.indexing.store import VectorStoreUnavailable
from serve.indexing.to_qdrant import export_index
from serve.indexing.vector_search import IndexSpec

COUNT, DIM = 2000, 64
LIMITS = {"max_conditions": 8, "max_values": 16}
COLORS = ("red", "green", "blue", "black")


def embedded_dir() -> Path:
    """A directory for an embedded store: in memory where the OS has one, because embedded
    Qdrant commits every point to SQLite with an fsync (about 60 points/s on a plain disk)."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="duet-qdrant-", dir=shm if shm.is_dir() else None))


def unit_rows(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def row(i: int) -> IndexRow:
    meta: dict[str, Any] = {
        "color": COLORS[i % 4],
        "year": 2000 + i % 25,
        "score": (i % 10) / 4,  # a float field
        "flag": bool(i % 3 == 0),
        "tags": ["a", str(i % 2)],  # a list: filterable in neither store
    }
    return IndexRow(f"key-{i}", f"caption {i}", meta, f"https://example.com/{i}.jpg")


@pytest.fixture(scope="module")
def stores() -> Iterator[dict[str, Any]]:
    """A flat FAISS index of COUNT rows, exported into an embedded Qdrant store."""
    root = embedded_dir()
    vectors = unit_rows(COUNT, 0)
    index_dir = write_index(
        root / "index", vectors, [row(i) for i in range(COUNT)], spec=IndexSpec(index_type="flat")
    )
    client = QdrantClient(path=str(root / "qdrant"))
    export_index(index_dir, "items", client, batch_rows=1000)
    client.close()
    faiss_index = SearchIndex.load(index_dir, writable=False)
    connection = QdrantConnection(QdrantConfig(path=root / "qdrant"))
    qdrant_index = QdrantIndex(connection, "items", expected_dim=DIM, writable=False)
    yield {"faiss": faiss_index, "qdrant": qdrant_index, "root": root, "connection": connection}
    qdrant_index.close()
    faiss_index.close()
    shutil.rmtree(root, ignore_errors=True)


def agreement(a: list[list[Any]], b: list[list[Any]]) -> float:
    """Mean share of FAISS's top ids that Qdrant also returns, per query."""
    shares = [
        len({h.id for h in x} & {h.id for h in y}) / len(y) if y else float(not x)
        for x, y in zip(a, b, strict=True)
    ]
    return float(np.mean(shares))


def test_top10_agrees_with_faiss_flat(stores: dict[str, Any]) -> None:
    queries = unit_rows(50, 1)
    qdrant_hits = stores["qdrant"].search(queries, 10)
    faiss_hits = stores["faiss"].search(queries, 10)
    assert agreement(qdrant_hits, faiss_hits) >= 0.99
    for q, f in zip(qdrant_hits, faiss_hits, strict=True):
        np.testing.assert_allclose([h.score for h in q], [h.score for h in f], atol=1e-5)
    best = qdrant_hits[0][0]
    assert IndexRow(best.key, best.caption, best.meta, best.url) == row(best.id)


@pytest.mark.parametrize(
    "raw",
    [
        {"color": "red"},
        {"color": {"in": ["green", "black"]}},
        {"year": {"gte": 2010, "lt": 2015}},
        {"year": {"in": [2003, 2007, 2024]}, "color": "blue"},
        {"score": 1.25},
        {"score": {"gt": 0.5, "lte": 2.0}},
        {"flag": True},
        {"flag": {"in": [0]}, "year": {"lt": 2003}},
        {"color": "purple"},  # matches nothing: both answer no hit
    ],
)
def test_filtered_top10_agrees_with_faiss_flat(stores: dict[str, Any], raw: Any) -> None:
    queries = unit_rows(6, 2)  # embedded Qdrant tests each point's payload in Python
    qdrant_where = stores["qdrant"].filter(raw, **LIMITS)
    faiss_where = stores["faiss"].filter(raw, **LIMITS)
    qdrant_hits = stores["qdrant"].search(queries, 10, where=qdrant_where)
    faiss_hits = stores["faiss"].search(queries, 10, where=faiss_where)
    assert agreement(qdrant_hits, faiss_hits) >= 0.99
    assert [len(h) for h in qdrant_hits] == [len(h) for h in faiss_hits]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"flag": {"gt": 0}}, "holds true/false"),  # Qdrant's ranges skip booleans
        ({"tags": "a"}, "not a filterable field"),
        ({"nope": 1}, "not a filterable field"),
        ({"color": 3}, "holds strings"),
        ({"year": "x"}, "holds numbers"),
        ({"year": {"near": 3}}, "unknown operator"),
    ],
)
def test_filters_qdrant_cannot_apply_are_refused(
    stores: dict[str, Any], raw: Any, says: str
) -> None:
    with pytest.raises(FilterError, match=says):
        stores["qdrant"].filter(raw, **LIMITS)


def test_items_read_back_like_faiss(stores: dict[str, Any]) -> None:
    qdrant, faiss_index = stores["qdrant"], stores["faiss"]
    assert qdrant.rows([5, 7, COUNT + 10]) == faiss_index.rows([5, 7, COUNT + 10])
    np.testing.assert_allclose(qdrant.vectors([9, 4]), faiss_index.vectors([9, 4]), atol=1e-6)
    with pytest.raises(KeyError):
        qdrant.vectors([COUNT + 10])
    assert qdrant.describe()["filterable"] == faiss_index.describe()["filterable"]
    assert qdrant.count == COUNT


def test_export_resumes_after_a_stop_and_never_writes_twice(tmp_path: Path) -> None:
    root = embedded_dir()
    try:
        vectors = unit_rows(500, 3)
        index_dir = write_index(tmp_path / "index", vectors, [row(i) for i in range(500)])
        client = QdrantClient(path=str(root))

        class StopAfter(io.StringIO):
            def write(self, text: str) -> int:
                if text.startswith("exported 200 "):
                    raise KeyboardInterrupt  # as if the run was stopped after two batches
                return super().write(text)

        with pytest.raises(KeyboardInterrupt):
            export_index(index_dir, "c", client, batch_rows=100, progress=StopAfter())
        connection = QdrantConnection(QdrantConfig(path=root), client)
        with pytest.raises(IndexLoadError, match="did not finish"):
            QdrantIndex(connection, "c", expected_dim=DIM)
        assert export_index(index_dir, "c", client, batch_rows=100) == 300  # the rest only
        assert export_index(index_dir, "c", client, batch_rows=100) == 0  # complete already
        assert client.count("c").count == 500
        other = write_index(tmp_path / "other", vectors[:10], [row(i) for i in range(10)])
        with pytest.raises(SystemExit, match="holds another index"):
            export_index(other, "c", client)
        assert export_index(other, "c", client, recreate=True) == 10
        client.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_export_takes_the_journalled_updates(tmp_path: Path) -> None:
    root = embedded_dir()
    try:
        index_dir = write_index(tmp_path / "index", unit_rows(50, 4), [row(i) for i in range(50)])
        writer = SearchIndex.load(index_dir, writable=True)
        (added,) = writer.add(unit_rows(1, 5), [IndexRow("new", "added", {"color": "red"})])
        writer.delete([3])
        writer.close()
        client = QdrantClient(path=str(root))
        export_index(index_dir, "c", client)
        connection = QdrantConnection(QdrantConfig(path=root), client)
        index = QdrantIndex(connection, "c", expected_dim=DIM, writable=True)
        assert index.count == 50 and added == 50
        assert index.get(added).caption == "added"
        assert 3 not in index.rows([3])
        assert index.add(unit_rows(1, 6), [row(0)]) == [51]  # after the journal's next id
        client.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def writable(tmp_path: Path) -> Iterator[tuple[QdrantConnection, QdrantIndex]]:
    root = embedded_dir()
    index_dir = write_index(tmp_path / "index", unit_rows(100, 7), [row(i) for i in range(100)])
    client = QdrantClient(path=str(root))
    export_index(index_dir, "c", client)
    connection = QdrantConnection(QdrantConfig(path=root), client)
    index = QdrantIndex(connection, "c", expected_dim=DIM, writable=True)
    yield connection, index
    client.close()
    shutil.rmtree(root, ignore_errors=True)


def test_added_and_deleted_items_are_seen_by_the_next_search(
    writable: tuple[QdrantConnection, QdrantIndex],
) -> None:
    connection, index = writable
    vectors = unit_rows(2, 8)
    ids = index.add(vectors, [IndexRow("n0", "new 0", {"color": "pink"}), row(1)], [b"img", None])
    assert ids == [100, 101] and index.count == 102
    (hits,) = index.search(vectors[:1], 1)
    assert hits[0].id == 100 and hits[0].caption == "new 0"
    pink = index.filter({"color": "pink"}, **LIMITS)
    assert [h.id for h in index.search(vectors[1:], 5, where=pink)[0]] == [100]
    assert index.thumbnail_of(100) == b"img" and index.thumbnail_of(101) is None
    assert index.delete([100, 100, 5000]) == ([100], [5000])
    assert all(h.id != 100 for h in index.search(vectors[:1], 10)[0])
    assert index.rows([100]) == {} and index.count == 101
    # the highest id is gone; a reader opened now (a restart) still never hands it out again
    again = QdrantIndex(connection, "c", expected_dim=DIM, writable=True)
    assert again.add(vectors[:1], [row(0)]) == [102]
    again.close()


def test_a_replica_that_claims_the_writes_takes_them_over(
    writable: tuple[QdrantConnection, QdrantIndex],
) -> None:
    connection, first = writable
    reader = QdrantIndex(connection, "c", expected_dim=DIM, writable=False)
    with pytest.raises(IndexReadOnlyError, match="opened read-only"):
        reader.delete([1])
    second = QdrantIndex(connection, "c", expected_dim=DIM, writable=True)
    with pytest.raises(IndexReadOnlyError, match="writes it since"):
        first.add(unit_rows(1, 9), [row(0)])
    assert not first.writable and first.rows([1])  # still serves reads
    assert second.delete([1]) == ([1], [])
    reader.close()
    second.close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_server_is_unavailable_not_an_error() -> None:
    connection = QdrantConnection(QdrantConfig(url=f"http://127.0.0.1:{closed_port()}"))
    index = QdrantIndex(connection, "c", expected_dim=DIM)  # loads; reads the collection later
    assert index.count == 0 and index.searches_in_threadpool
    started = time.monotonic()
    with pytest.raises(VectorStoreUnavailable, match="did not answer"):
        index.search(unit_rows(1, 10), 5)
    with pytest.raises(VectorStoreUnavailable):
        index.add(unit_rows(1, 10), [row(0)])
    assert time.monotonic() - started < 10
    index.close()


def test_a_server_that_never_answers_is_unavailable_within_the_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (the kernel does), never answers
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        connection = QdrantConnection(QdrantConfig(url=url, timeout_s=1))
        started = time.monotonic()
        index = QdrantIndex(connection, "c", expected_dim=DIM)
        with pytest.raises(VectorStoreUnavailable):
            index.search(unit_rows(1, 11), 5)
        assert time.monotonic() - started < 15  # two calls of ~1 s each, with a wide margin
        index.close()
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        listener.close()
