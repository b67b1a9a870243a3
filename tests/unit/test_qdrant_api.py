"""The service with `DUET_VECTOR_STORE=qdrant` (embedded Qdrant) over HTTP: /search,
/knn-service, thumbnails, filters, item add / get / delete and /classify answer as with FAISS;
an unreachable Qdrant server is a 503 envelope with Retry-After, and /health stays up."""

from __future__ import annotations

import base64
import contextlib
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
from fastapi.testclient import TestClient
from qdrant_client import QdrantClient

from serve.app import create_app
from serve.indexing.index import SearchIndex
from serve.indexing.to_qdrant import export_index
from serve.settings import Settings
from tests.serve_support import (
    assert_envelope,
    b64,
    make_artifact,
    make_index,
    make_shard,
    png,
    wait_until_loaded,
)

SAMPLES = 24
DIM = 64  # duet-micro


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A built index (with thumbnails) and its export into an embedded Qdrant store."""
    root = tmp_path_factory.mktemp("qdrant-api")
    artifact = make_artifact(root)
    index = make_index(artifact, make_shard(root / "synth", SAMPLES), root / "built")
    shm = Path("/dev/shm")
    store = Path(tempfile.mkdtemp(prefix="duet-qdrant-", dir=shm if shm.is_dir() else None))
    client = QdrantClient(path=str(store))
    export_index(index, "synth", client)
    client.close()
    yield {"artifact": artifact, "index": index, "store": store}
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="module")
def client(built: dict[str, Path]) -> Iterator[TestClient]:
    settings = Settings(
        artifact_dir=built["artifact"],
        vector_store="qdrant",
        qdrant_path=built["store"],
        qdrant_collections="synth",  # served as "default"
    )
    with TestClient(create_app(settings)) as test_client:
        assert wait_until_loaded(test_client).status_code == 200
        yield test_client


@pytest.fixture(scope="module")
def faiss_index(built: dict[str, Path]) -> Iterator[SearchIndex]:
    index = SearchIndex.load(built["index"], writable=False)
    yield index
    index.close()


def unit(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).standard_normal(DIM)
    return (vector / np.linalg.norm(vector)).tolist()


def search(client: TestClient, **query: Any) -> list[dict[str, Any]]:
    response = client.post("/search", json=query)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_search_answers_as_the_faiss_index_does(
    client: TestClient, faiss_index: SearchIndex
) -> None:
    for seed in range(5):
        vector = unit(seed)
        found = search(client, embedding=vector, k=5)
        (expected,) = faiss_index.search(np.asarray([vector], np.float32), 5)
        assert [hit["id"] for hit in found] == [hit.id for hit in expected]
        assert [hit["caption"] for hit in found] == [hit.caption for hit in expected]
        assert [hit["metadata"] for hit in found] == [hit.meta for hit in expected]
    by_id = search(client, id=3, k=4)
    assert 3 not in [hit["id"] for hit in by_id] and len(by_id) == 4
    (text_hit, *_) = search(client, text="a red circle", k=3, dedup=0.99)
    thumbnail = client.get(text_hit["thumbnail_url"])
    assert thumbnail.status_code == 200
    assert thumbnail.content == faiss_index.thumbnail_of(text_hit["id"])


def test_knn_service_returns_results_with_thumbnails(
    client: TestClient, faiss_index: SearchIndex
) -> None:
    response = client.post("/knn-service", json={"text": "a blue square", "num_images": 3})
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 3
    first = results[0]
    assert base64.b64decode(first["image"]) == faiss_index.thumbnail_of(first["id"])
    assert first["caption"] == faiss_index.get(first["id"]).caption


def test_filters_translate_or_are_refused_with_422(
    client: TestClient, faiss_index: SearchIndex
) -> None:
    (info,) = client.get("/indices").json()["indices"]
    assert info["vector_store"] == "qdrant" and info["count"] == SAMPLES
    name = next(field for field, kind in info["filterable"].items() if kind == "string")
    value = faiss_index.get(0).meta[name]
    vector = unit(7)
    found = search(client, embedding=vector, k=10, filter={name: value})
    where = faiss_index.filter({name: value}, max_conditions=8, max_values=8)
    (expected,) = faiss_index.search(np.asarray([vector], np.float32), 10, where=where)
    assert [hit["id"] for hit in found] == [hit.id for hit in expected]
    refused = client.post("/search", json={"embedding": vector, "filter": {"nope": "x"}})
    assert "not a filterable field" in assert_envelope(refused, 422, "validation_error")["error"]


def test_items_are_added_read_and_deleted(client: TestClient) -> None:
    vector = unit(11)
    response = client.post(
        "/indices/default/items",
        json={"items": [{"embedding": vector, "caption": "added", "metadata": {"k": 1}}]},
    )
    assert response.status_code == 200, response.text
    (item_id,) = response.json()["ids"]
    assert item_id == SAMPLES
    assert search(client, embedding=vector, k=1)[0]["id"] == item_id
    assert client.get(f"/indices/default/items/{item_id}").json()["caption"] == "added"
    image = client.post(
        "/indices/default/items", files=[("image", ("a.png", png(24), "image/png"))]
    )
    assert image.status_code == 200, image.text
    (image_item,) = image.json()["items"]
    assert client.get(image_item["thumbnail_url"]).status_code == 200  # kept in the payload
    deleted = client.delete(f"/indices/default/items/{item_id}")
    assert deleted.json()["deleted"] == [item_id]
    assert all(hit["id"] != item_id for hit in search(client, embedding=vector, k=5))
    assert_envelope(client.get(f"/indices/default/items/{item_id}"), 404, "not_found")


def test_classify_needs_no_index(client: TestClient) -> None:
    response = client.post("/classify", json={"images": [b64(png(32))], "labels": ["red", "blue"]})
    assert response.status_code == 200, response.text


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_qdrant_server_is_a_503_with_retry_after(
    built: dict[str, Path],
) -> None:
    settings = Settings(
        artifact_dir=built["artifact"],
        vector_store="qdrant",
        qdrant_url=f"http://127.0.0.1:{closed_port()}",
        qdrant_collections='{"default": "synth"}',
        qdrant_timeout_s=2,
        retry_after_s=3,
    )
    with TestClient(create_app(settings)) as test_client:
        assert wait_until_loaded(test_client).status_code == 200  # reads it once it answers
        assert test_client.get("/health").status_code == 200
        for response in (
            test_client.post("/search", json={"embedding": unit(1)}),
            test_client.post("/search", json={"text": "a red circle"}),
            test_client.post("/knn-service", json={"text": "a red circle"}),
            test_client.post("/indices/default/items", json={"items": [{"embedding": unit(2)}]}),
            test_client.get("/indices"),
        ):
            body = assert_envelope(response, 503, "unavailable")
            assert response.headers["retry-after"] == "3"
            assert "did not answer" in body["error"] and "127.0.0.1" not in body["error"]


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers (a hung Qdrant); its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel accepts; nothing ever reads or writes
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_a_hung_qdrant_server_does_not_hold_up_encoding(built: dict[str, Path]) -> None:
    """A text search waiting on Qdrant waits in the threadpool, not on the encoder's thread:
    an /embed sent meanwhile is answered at once, and the search gets its 503 at the timeout."""
    with silent_server() as url:
        settings = Settings(
            artifact_dir=built["artifact"],
            vector_store="qdrant",
            qdrant_url=url,
            qdrant_collections="synth",
            qdrant_timeout_s=4,
        )
        with TestClient(create_app(settings)) as test_client:
            assert wait_until_loaded(test_client, timeout_s=120).status_code == 200
            answers: list[Any] = []
            search = threading.Thread(
                target=lambda: answers.append(
                    test_client.post("/search", json={"text": "a red circle"})
                )
            )
            search.start()
            time.sleep(0.5)  # the search is waiting on Qdrant by now
            started = time.monotonic()
            embedded = test_client.post("/embed", json={"texts": ["a blue square"]})
            embed_s = time.monotonic() - started
            search.join(timeout=60)
            assert embedded.status_code == 200 and search_waited(answers)
            assert embed_s < 2.5, f"/embed waited {embed_s:.1f} s behind the search"


def search_waited(answers: list[Any]) -> bool:
    (response,) = answers
    return response.status_code == 503 and response.json()["type"] == "unavailable"


def test_settings_take_one_qdrant_and_its_collections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base: dict[str, Any] = {"artifact_dir": tmp_path, "vector_store": "qdrant"}
    one = Settings(**base, qdrant_url="http://qdrant:6333", qdrant_collections="laion")
    assert one.index_sources == {"default": "laion"}
    monkeypatch.setenv("DUET_QDRANT_COLLECTIONS", '{"photos": "c1", "docs": "c2"}')
    monkeypatch.setenv("DUET_QDRANT_PATH", str(tmp_path))
    assert Settings(**base).index_sources == {"photos": "c1", "docs": "c2"}
    monkeypatch.delenv("DUET_QDRANT_PATH")
    with pytest.raises(ValueError, match="one of qdrant_url"):
        Settings(**base)
    with pytest.raises(ValueError, match="index_dir and indices are for faiss"):
        Settings(**base, qdrant_url="http://q:6333", index_dir=tmp_path)
    monkeypatch.delenv("DUET_QDRANT_COLLECTIONS")
    with pytest.raises(ValueError, match="serves qdrant_collections"):
        Settings(**base, qdrant_url="http://q:6333")
    faiss = Settings(artifact_dir=tmp_path, index_dir=tmp_path)
    assert faiss.index_sources == {"default": tmp_path}
