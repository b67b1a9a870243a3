"""The service's production features over HTTP: named indices and reload, every kind of search,
classify and embed, dynamic batching, limits (401/413/422/429), metrics and CORS."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from common.shards import RawSample
from serve.app import create_app
from serve.indexing.index import write_index
from serve.service import Service
from serve.settings import Settings
from tests.serve_support import (
    assert_envelope,
    b64,
    make_artifact,
    make_index,
    make_shard,
    png,
    read_samples,
    wait_until_loaded,
)

SAMPLES, SECOND_SAMPLES = 24, 12
MAX_K = 20
MAX_ITEMS = 4
LABELS = ["red circle", "blue square", "green star"]
TEMPLATES = ["a photo of a {}.", "a {} shape."]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("service")
    shard = make_shard(root / "synth", SAMPLES)
    second = make_shard(root / "synth2", SECOND_SAMPLES, seed=1)
    artifact = make_artifact(root)
    return {
        "root": root,
        "artifact": artifact,
        "default": make_index(artifact, shard, root / "index"),
        "second": make_index(artifact, second, root / "index2"),
        "samples": read_samples(shard),
    }


@pytest.fixture(scope="module")
def settings(samples: dict[str, Any]) -> Settings:
    vectors = np.zeros((6, 64), np.float32)  # pairs of (near-)duplicates, for dedup
    vectors[[0, 1], 0] = 1.0
    vectors[2, :2] = [0.999, 0.0447]
    vectors[[3, 4], 1] = 1.0
    vectors[5, 2] = 1.0
    dups = write_index(
        samples["root"] / "dups", vectors, [(f"d{i}", f"dup {i}", {}) for i in range(6)]
    )
    return Settings(
        artifact_dir=samples["artifact"],
        index_dir=samples["default"],
        indices={"second": samples["second"], "dups": dups},
        label_sets={"shapes": {"labels": LABELS, "templates": TEMPLATES}},
        max_k=MAX_K,
        max_upload_bytes=64 * 1024,
        max_request_bytes=1 << 20,
        max_image_pixels=100 * 100,
        max_items_per_request=MAX_ITEMS,
        max_text_chars=200,
        cors_origins=["http://front.example"],
    )


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        assert wait_until_loaded(test_client).status_code == 200
        yield test_client


def _service(client: TestClient) -> Service:
    service = client.app.state.service.service  # type: ignore[attr-defined]
    assert service is not None
    return service


def _search(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _ids(body: dict[str, Any]) -> list[int]:
    return [hit["id"] for hit in body["results"]]


# --- search ------------------------------------------------------------------------------------


def test_search_by_base64_image_finds_itself(client: TestClient, samples: dict[str, Any]) -> None:
    sample: RawSample = samples["samples"][3]
    for encoded in (b64(sample.image), "data:image/jpeg;base64," + b64(sample.image)):
        top = _search(client, image=encoded, k=3)["results"][0]
        assert top["key"] == sample.key and top["score"] == pytest.approx(1.0, abs=1e-4)


def test_text_search_equals_encoding_and_searching_in_process(client: TestClient) -> None:
    service = _service(client)
    body = _search(client, text="a green star", k=6)
    with service.indices.lease() as index:
        (hits,) = index.search(service.encoder.encode_texts(["a green star"]), 6)
    assert _ids(body) == [hit.id for hit in hits]
    for got, want in zip(body["results"], hits, strict=True):
        assert got["score"] == pytest.approx(want.score, abs=1e-5)


def test_search_by_embedding_matches_text_search(client: TestClient) -> None:
    embedded = client.post("/embed", json={"texts": ["a red circle"]}).json()
    vector = np.array(embedded["text_embeddings"][0])
    by_text = _search(client, text="a red circle", k=5)
    by_vector = _search(client, embedding=(3.0 * vector).tolist(), k=5)  # normalised by us
    assert _ids(by_text) == _ids(by_vector)
    for a, b in zip(by_text["results"], by_vector["results"], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_more_like_this_leaves_out_the_item(client: TestClient, samples: dict[str, Any]) -> None:
    body = _search(client, id=5, k=4)
    assert 5 not in _ids(body) and len(body["results"]) == 4
    image = _search(client, image=b64(samples["samples"][5].image), k=5)
    assert _ids(image)[0] == 5 and _ids(image)[1:] == _ids(body)


def test_dedup_drops_near_duplicates(client: TestClient) -> None:
    """Index "dups" holds three groups: {0, 1, 2} (cosine >= 0.999), {3, 4} (equal), {5}."""
    query = [1.0] + [0.0] * 63
    plain = _search(client, embedding=query, index="dups", k=4)
    assert set(_ids(plain)[:3]) == {0, 1, 2}
    deduped = _search(client, embedding=query, index="dups", k=4, dedup=0.99)
    assert deduped["index"] == "dups"
    groups = [{0, 1, 2}, {3, 4}, {5}]
    assert sorted(next(i for i, g in enumerate(groups) if hit in g) for hit in _ids(deduped)) == [
        0,
        1,
        2,
    ]  # one per group: duplicates dropped, and refilled from the further candidates
    assert _ids(deduped)[0] in groups[0]


def test_named_index(client: TestClient) -> None:
    body = _search(client, text="a blue square", index="second", k=MAX_K)
    assert body["index"] == "second" and len(body["results"]) == SECOND_SAMPLES


def test_filtered_search_json_multipart_and_knn_service(
    client: TestClient, samples: dict[str, Any]
) -> None:
    """Every result matches the filter, and all matching items come back when k is larger."""
    by_color: dict[str, set[str]] = {}
    for sample in samples["samples"]:
        by_color.setdefault(sample.meta["color"], set()).add(sample.key)
    color, keys = max(by_color.items(), key=lambda item: len(item[1]))
    assert 1 < len(keys) < SAMPLES
    body = _search(client, text="a green star", k=MAX_K, filter={"color": color})
    assert {hit["key"] for hit in body["results"]} == keys
    assert all(hit["metadata"]["color"] == color for hit in body["results"])
    other = sorted(by_color.keys() - {color})[:2]
    ranged = _search(
        client, text="a star", k=3, filter={"color": {"in": other}, "label": {"gte": 0}}
    )
    assert len(ranged["results"]) == 3
    assert all(hit["metadata"]["color"] in other for hit in ranged["results"])
    response = client.post(
        "/search",
        files={"image": ("q.png", png(16), "image/png")},
        data={"k": "4", "filter": f'{{"color": "{color}"}}'},
    )
    assert response.status_code == 200, response.text
    assert {hit["key"] for hit in response.json()["results"]} <= keys
    knn = client.post(
        "/knn-service", json={"text": "a star", "num_images": MAX_K, "filter": {"color": color}}
    )
    assert knn.status_code == 200, knn.text
    assert {hit["key"] for hit in knn.json()} == keys
    filterable = client.get("/indices").json()["indices"][0]["filterable"]
    assert filterable["color"] == "string" and filterable["label"] == "number"


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("/search", {"text": "a", "filter": {"colour": "red"}}, "body.filter: field 'colour' is"),
        ("/search", {"text": "a", "filter": {"label": {"near": 3}}}, "unknown operator 'near'"),
        ("/search", {"text": "a", "filter": {"color": 3}}, "field 'color' holds strings"),
        ("/search", {"text": "a", "filter": {"label": {"in": list(range(65))}}}, "65 values"),
        ("/knn-service", {"text": "a", "filter": {"colour": "red"}}, "field 'colour' is not"),
        ("/search", {"text": "a", "filter": ["color"]}, "body.filter"),
    ],
)
def test_bad_filters_are_422_naming_the_field(
    client: TestClient, route: str, body: dict[str, Any], message: str
) -> None:
    error = assert_envelope(client.post(route, json=body), 422, "validation_error")
    assert message in error["error"], error


def test_bad_multipart_filter_is_422(client: TestClient) -> None:
    response = client.post(
        "/search", files={"image": ("q.png", png(16), "image/png")}, data={"filter": "{color"}
    )
    assert "body.filter: not JSON" in assert_envelope(response, 422, "validation_error")["error"]


BAD_SEARCHES: list[tuple[str, dict[str, Any] | bytes, int, str]] = [
    ("unknown index", {"text": "red", "index": "nope"}, 404, "not_found"),
    ("unknown id", {"id": SAMPLES}, 404, "not_found"),
    ("two queries", {"text": "red", "id": 1}, 422, "validation_error"),
    ("no query", {"k": 2}, 422, "validation_error"),
    ("short embedding", {"embedding": [1.0, 2.0]}, 422, "validation_error"),
    ("zero embedding", {"embedding": [0.0] * 64}, 422, "validation_error"),
    ("infinite embedding", b'{"embedding": [1e400' + b", 0" * 63 + b"]}", 422, "validation_error"),
    ("NaN embedding", b'{"embedding": [NaN' + b", 0" * 63 + b"]}", 422, "validation_error"),
    ("bad base64", {"image": "not base64!"}, 422, "validation_error"),
    ("base64 over limit", {"image": b64(b"\xff" * (64 * 1024 + 1))}, 413, "too_large"),
    ("base64 not an image", {"image": b64(b"hello")}, 415, "not_an_image"),
    ("base64 too many pixels", {"image": b64(png(200))}, 413, "image_too_large"),
    ("dedup over 1", {"text": "red", "dedup": 1.5}, 422, "validation_error"),
]


@pytest.mark.parametrize(
    ("body", "status", "type_"), [c[1:] for c in BAD_SEARCHES], ids=[c[0] for c in BAD_SEARCHES]
)
def test_bad_search(
    client: TestClient, body: dict[str, Any] | bytes, status: int, type_: str
) -> None:
    if isinstance(body, bytes):  # JSON that Python's json module would not write
        response = client.post(
            "/search", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = client.post("/search", json=body)
    assert_envelope(response, status, type_)


# --- indices -----------------------------------------------------------------------------------


def test_indices_and_reload(client: TestClient, samples: dict[str, Any]) -> None:
    listed = client.get("/indices").json()["indices"]
    assert [(i["name"], i["default"], i["count"]) for i in listed] == [
        ("default", True, SAMPLES),
        ("second", False, SECOND_SAMPLES),
        ("dups", False, 6),
    ]
    assert listed[0]["dim"] == 64 and listed[0]["model"] == "duet-micro"
    reloaded = client.post("/indices/second/reload")
    assert reloaded.status_code == 200 and reloaded.json()["count"] == SECOND_SAMPLES
    assert_envelope(client.post("/indices/nope/reload"), 404, "not_found")


def test_failed_reload_is_409_and_keeps_serving(client: TestClient, tmp_path: Path) -> None:
    registry = _service(client).indices
    directory = registry._paths["dups"]
    manifest = (directory / "index.json").read_text()
    (directory / "index.json").write_text("{broken")
    try:
        assert_envelope(client.post("/indices/dups/reload"), 409, "reload_failed")
    finally:
        (directory / "index.json").write_text(manifest)
    assert len(_search(client, embedding=[1.0] + [0.0] * 63, index="dups", k=2)["results"]) == 2


def test_reload_in_a_loop_under_concurrent_searches_fails_nothing(client: TestClient) -> None:
    stop = threading.Event()
    statuses: list[int] = []

    def searcher(i: int) -> None:
        while not stop.is_set():
            body = {"text": f"a shape number {i}", "k": 3, "index": ("default", "second")[i % 2]}
            statuses.append(client.post("/search", json=body).status_code)

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    reloads = 0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for name in ("default", "second"):
            assert client.post(f"/indices/{name}/reload").status_code == 200
            reloads += 1
    stop.set()
    for thread in threads:
        thread.join(30)
    assert reloads >= 4 and len(statuses) >= 16
    assert set(statuses) == {200}, f"{sum(s != 200 for s in statuses)} of {len(statuses)} failed"


# --- classify and embed ------------------------------------------------------------------------


def test_classify_several_images_with_a_label_set(
    client: TestClient, samples: dict[str, Any]
) -> None:
    images = [s.image for s in samples["samples"][:3]]
    files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    by_set = client.post("/classify", files=files, data={"label_set": "shapes"})
    assert by_set.status_code == 200, by_set.text
    body = by_set.json()
    assert body["label_set"] == "shapes" and body["templates"] == TEMPLATES
    assert len(body["results"]) == 3 and body["predictions"] == body["results"][0]["predictions"]
    by_labels = client.post(
        "/classify",
        json={"images": [b64(d) for d in images], "labels": LABELS, "templates": TEMPLATES},
    ).json()
    for a, b in zip(body["results"], by_labels["results"], strict=True):
        probabilities = [p["probability"] for p in a["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        for p, q in zip(a["predictions"], b["predictions"], strict=True):
            assert p["probability"] == pytest.approx(q["probability"], abs=1e-5)
    assert client.get("/label-sets").json() == [
        {"name": "shapes", "labels": LABELS, "templates": TEMPLATES}
    ]


def test_label_prompts_are_cached_one_by_one(client: TestClient) -> None:
    """A label added to a known set costs only its own prompts; the cache is bounded."""
    service: Service = client.app.state.service.service  # type: ignore[attr-defined]
    cache = service.prompt_cache
    labels = ["cached circle", "cached square"]
    body = {"images": [b64(png(8))], "labels": labels, "templates": TEMPLATES}
    assert client.post("/classify", json=body).status_code == 200
    before = len(cache)
    body["labels"] = [*labels, "cached star"]
    assert client.post("/classify", json=body).status_code == 200
    assert len(cache) == min(before + len(TEMPLATES), cache.entries)
    assert cache.get_many(service.encoder.model_name, ["a cached star shape."])[0] is not None


BAD_CLASSIFIES: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown label set", {"images": [b64(png(8))], "label_set": "nope"}, 404, "not_found"),
    (
        "set and labels",
        {"images": [b64(png(8))], "label_set": "shapes", "labels": LABELS},
        422,
        "validation_error",
    ),
    (
        "set and templates",
        {"images": [b64(png(8))], "label_set": "shapes", "templates": ["{}"]},
        422,
        "validation_error",
    ),
    (
        "too many images",
        {"images": [b64(png(8))] * (MAX_ITEMS + 1), "labels": LABELS},
        422,
        "validation_error",
    ),
    ("no images", {"images": [], "labels": LABELS}, 422, "validation_error"),
]


@pytest.mark.parametrize(
    ("body", "status", "type_"), [c[1:] for c in BAD_CLASSIFIES], ids=[c[0] for c in BAD_CLASSIFIES]
)
def test_bad_classify(client: TestClient, body: dict[str, Any], status: int, type_: str) -> None:
    assert_envelope(client.post("/classify", json=body), status, type_)


def test_embed_texts_and_images(client: TestClient, samples: dict[str, Any]) -> None:
    service = _service(client)
    image = samples["samples"][0].image
    body = client.post(
        "/embed", json={"texts": ["a red circle", "x"], "images": [b64(image)]}
    ).json()
    assert body["model"] == "duet-micro" and body["dim"] == 64
    texts, images = np.array(body["text_embeddings"]), np.array(body["image_embeddings"])
    assert texts.shape == (2, 64) and images.shape == (1, 64)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        texts, service.encoder.encode_texts(["a red circle", "x"]), atol=1e-5
    )
    files = [("image", ("a.jpg", image, "image/jpeg"))]
    multipart = client.post("/embed", files=files, data={"texts": ["a red circle"]}).json()
    np.testing.assert_allclose(multipart["image_embeddings"], images, atol=1e-5)
    np.testing.assert_allclose(multipart["text_embeddings"][0], texts[0], atol=1e-5)
    assert_envelope(
        client.post("/embed", json={"texts": ["t"] * (MAX_ITEMS + 1)}), 422, "validation_error"
    )
    assert_envelope(client.post("/embed", json={}), 422, "validation_error")
    assert_envelope(client.post("/embed", json={"texts": ["x" * 201]}), 422, "validation_error")


# --- batching, overload, metrics ---------------------------------------------------------------


def _hold_the_encoder(
    service: Service, cost_items: int
) -> tuple[threading.Event, threading.Thread]:
    """Occupy the encoder thread with a job counting `cost_items` until the event is set."""
    release, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    holder = threading.Thread(target=lambda: asyncio.run(service.batcher.run(hold, cost_items)))
    holder.start()
    assert started.wait(30)
    return release, holder


def test_concurrent_searches_are_batched_and_get_their_own_results(client: TestClient) -> None:
    texts = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]
    alone = {text: _ids(_search(client, text=text, k=5)) for text in texts}
    service = _service(client)
    before = _metric(client, 'duet_encode_batch_requests_sum{kind="text"}')
    release, holder = _hold_the_encoder(service, 1)
    results: dict[str, list[int]] = {}
    threads = [
        threading.Thread(
            target=lambda t=text: results.__setitem__(t, _ids(_search(client, text=t, k=5)))
        )
        for text in texts
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while service.batcher.pending_items < 1 + len(texts) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads + [holder]:
        thread.join(30)
    assert results == alone
    jobs = _metric(client, 'duet_encode_batch_requests_sum{kind="text"}') - before
    batches = _histogram_count(client, "duet_encode_batch_requests", "text")
    assert (
        jobs == len(texts)
        and _metric(client, 'duet_encode_batch_size_bucket{kind="text",le="4.0"}') < batches
    )


def test_full_queue_answers_429_with_retry_after(client: TestClient, settings: Settings) -> None:
    service = _service(client)
    release, holder = _hold_the_encoder(service, settings.max_queue_items)
    try:
        response = client.post("/search", json={"text": "red circle"})
        assert_envelope(response, 429, "overloaded")
        assert response.headers["retry-after"] == str(settings.retry_after_s)
    finally:
        release.set()
        holder.join(30)
    assert _search(client, text="red circle")["results"]
    assert _metric(client, "duet_encode_rejected_total") >= 1


def _metrics_text(client: TestClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


def _metric(client: TestClient, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", _metrics_text(client), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _histogram_count(client: TestClient, name: str, kind: str) -> float:
    return _metric(client, f'{name}_count{{kind="{kind}"}}')


def test_metrics(client: TestClient) -> None:
    _search(client, text="red circle")
    client.post("/search", json={"text": ""})
    text = _metrics_text(client)
    assert re.search(
        r'duet_http_requests_total\{method="POST",route="/search",status="200"\} [1-9]', text
    )
    assert re.search(
        r'duet_http_requests_total\{method="POST",route="/search",status="422"\} [1-9]', text
    )
    assert (
        'duet_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/search",status="200"}'
        in text
    )
    assert f'duet_index_vectors{{index="default"}} {float(SAMPLES)}' in text
    assert "duet_encode_queue_items 0.0" in text and "duet_ready 1.0" in text
    client.get("/no/such/path")
    assert 'route="unmatched",status="404"' in _metrics_text(client)


def test_cors_preflight_and_exposed_headers(client: TestClient) -> None:
    preflight = client.options(
        "/knn-service",
        headers={"Origin": "http://front.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://front.example"
    response = client.post(
        "/search", json={"text": "red"}, headers={"Origin": "http://front.example"}
    )
    assert "X-Duet-Ignored" in response.headers["access-control-expose-headers"]
    other = client.post("/search", json={"text": "red"}, headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# --- API key -----------------------------------------------------------------------------------


def test_api_key(settings: Settings) -> None:
    with TestClient(
        create_app(settings.model_copy(update={"api_key": SecretStr("s3cret")}))
    ) as client:
        assert wait_until_loaded(client).status_code == 200  # /ready is public
        for path in ("/health", "/", "/static/app.js", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        body = {"text": "red circle"}
        assert (
            "API key"
            in assert_envelope(client.post("/search", json=body), 401, "unauthorized")["error"]
        )
        wrong = client.post("/search", json=body, headers={"X-API-Key": "nope"})
        assert assert_envelope(wrong, 401, "unauthorized")["error"] == "the API key is not valid"
        assert client.post("/search", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        bearer = {"Authorization": "Bearer s3cret"}
        assert client.post("/search", json=body, headers=bearer).status_code == 200
        for method, path in [
            ("GET", "/metrics"),
            ("GET", "/indices"),
            ("GET", "/indices-list"),
            ("POST", "/indices/default/reload"),
            ("POST", "/embed"),
        ]:
            response = client.request(method, path)
            assert_envelope(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
