"""The HTTP service: liveness and readiness, search by text and image, classify, error envelopes
(OpenAI's on /v1), HEAD wherever GET."""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.routing import Mount

from common.artifact import write_artifact
from common.model import build_model
from common.shards import RawSample, iter_shards
from serve.app import create_app
from serve.batching import Overloaded
from serve.indexing.build import build_index
from serve.indexing.index import write_index
from serve.settings import Settings
from tests.serve_support import (
    assert_envelope,
    assert_openai_envelope,
    png,
    wait_until_loaded,
)
from train import synth

SAMPLES = 24
MAX_K = 20
MAX_UPLOAD_BYTES = 64 * 1024
MAX_IMAGE_PIXELS = 100 * 100  # the synthetic images are 32 x 32
MAX_LABELS = 8
LABELS = ["red circle", "blue square", "green star"]


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("synth")
    synth.generate(
        root, train_shards=1, samples_per_shard=SAMPLES, seed=0, val_samples=1, image_size=32
    )
    return str(root / "train" / "shard-000000.tar")


@pytest.fixture(scope="module")
def samples(shard: str) -> list[RawSample]:
    return list(iter_shards(shard, Counter()))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_artifact(
        build_model("duet-micro"), tmp_path_factory.mktemp("model") / "artifact", provenance={}
    )


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, artifact: Path, shard: str) -> Settings:
    index_dir = tmp_path_factory.mktemp("index") / "index"
    build_index(artifact, shard, index_dir, batch_size=16)
    return Settings(
        artifact_dir=artifact,
        index_dir=index_dir,
        max_k=MAX_K,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_labels=MAX_LABELS,
        max_templates=4,
        max_text_chars=200,
        max_request_bytes=1 << 20,
    )


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:  # `with`: the lifespan runs
        assert wait_until_loaded(test_client).status_code == 200
        yield test_client


# --- readiness ---------------------------------------------------------------------------------


def test_health_and_ready_after_load(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "model": "duet-micro",
        "index_count": SAMPLES,
        "indices": {"default": SAMPLES},
        "runtime": "torch",  # the suite pins it (tests/conftest.py)
        "runtime_fallback": None,
    }


def test_searches_run_with_the_configured_faiss_threads(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`search_threads` holds on the batcher's thread while /search runs its FAISS search (OpenMP
    keeps the setting per thread, so setting it once on the loading thread misses it), and is
    put back afterwards: torch shares FAISS's OpenMP runtime, so a count left at 1 there would
    run every later forward pass of the batcher on one core."""
    threads = fresh_thread_faiss_threads() + 1  # not what that thread would get by default
    during: list[int] = []
    knn = faiss.knn

    def observed_knn(*args: object, **kwargs: object) -> object:
        during.append(faiss.omp_get_max_threads())
        return knn(*args, **kwargs)

    monkeypatch.setattr(faiss, "knn", observed_knn)  # the exact index's search, observed
    app = create_app(settings.model_copy(update={"search_threads": threads}))
    with TestClient(app) as client:
        assert wait_until_loaded(client).status_code == 200
        batcher = app.state.service.service.batcher
        torch_threads = client.portal.call(batcher.run, torch.get_num_threads, 1)
        assert client.post("/search", json={"text": "red circle", "k": 3}).status_code == 200
        assert during == [threads]
        assert client.portal.call(batcher.run, torch.get_num_threads, 1) == torch_threads


def fresh_thread_faiss_threads() -> int:
    """FAISS's OpenMP threads in a thread that never set them."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(faiss.omp_get_max_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_not_ready_before_load(settings: Settings) -> None:
    client = TestClient(create_app(settings))  # no `with`: the lifespan never runs
    assert client.get("/health").status_code == 200  # alive, though not ready
    body = assert_envelope(client.get("/ready"), 503, "not_ready")
    assert "loading" in body["error"]
    assert_envelope(client.post("/search", json={"text": "red circle"}), 503, "not_ready")


def test_load_failure_is_reported_by_ready(settings: Settings, tmp_path: Path) -> None:
    broken = settings.model_copy(update={"artifact_dir": tmp_path / "missing"})
    with TestClient(create_app(broken)) as client:
        body = assert_envelope(wait_until_loaded(client), 503, "not_ready")
        assert client.get("/health").status_code == 200
    assert "failed to load" in body["error"] and "missing" in body["error"]
    assert str(tmp_path) not in body["error"]  # clients see no absolute paths of the host


def test_index_of_other_dim_is_refused(settings: Settings, tmp_path: Path) -> None:
    write_index(tmp_path / "index8", np.eye(8, dtype=np.float32), [("k", "c", {})] * 8)
    mismatched = settings.model_copy(update={"index_dir": tmp_path / "index8"})
    with TestClient(create_app(mismatched)) as client:
        body = assert_envelope(wait_until_loaded(client), 503, "not_ready")
    assert "dim 8" in body["error"] and "embed_dim is 64" in body["error"]


# --- search and classify -----------------------------------------------------------------------


def test_search_by_text(client: TestClient) -> None:
    response = client.post("/search", json={"text": "  red circle ", "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 5 and body["took_ms"] >= 0 and body["index"] == "default"
    scores = [hit["score"] for hit in body["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    for hit in body["results"]:
        assert set(hit) == {"id", "key", "score", "caption", "url", "metadata", "thumbnail_url"}
        assert hit["url"] is None  # the synthetic shards have no URLs
        assert {"shape", "color", "classname"} <= set(hit["metadata"])
        assert hit["caption"] == hit["metadata"]["caption"]


def test_search_default_k_and_k_over_count(client: TestClient, settings: Settings) -> None:
    assert (
        len(client.post("/search", json={"text": "star"}).json()["results"]) == settings.default_k
    )
    body = client.post("/search", json={"text": "star", "k": MAX_K}).json()
    assert len(body["results"]) == MAX_K  # k <= count here; the index holds SAMPLES


def test_search_by_image_finds_itself(client: TestClient, samples: list[RawSample]) -> None:
    for sample in samples[:3]:
        files = {"image": (f"{sample.key}.jpg", sample.image, "image/jpeg")}
        response = client.post("/search", files=files, data={"k": "4"})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 4
        assert results[0]["key"] == sample.key
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert results[0]["metadata"] == {
            **sample.meta,
            "shard": Path(sample.url).name,
            "member": f"{sample.key}.jpg",
        }


@pytest.mark.parametrize("labels", [LABELS, [", ".join(LABELS)]], ids=["repeated", "comma"])
def test_classify(
    client: TestClient, settings: Settings, samples: list[RawSample], labels: list[str]
) -> None:
    files = {"image": ("x.jpg", samples[0].image, "image/jpeg")}
    response = client.post("/classify", files=files, data={"labels": labels})
    assert response.status_code == 200, response.text
    body = response.json()
    probabilities = [p["probability"] for p in body["predictions"]]
    assert sorted(p["label"] for p in body["predictions"]) == sorted(LABELS)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert probabilities == sorted(probabilities, reverse=True)
    assert body["templates"] == settings.default_templates


def test_classify_with_templates(client: TestClient, samples: list[RawSample]) -> None:
    templates = ["a {} shape.", "{} on noise"]
    files = {"image": ("x.jpg", samples[0].image, "image/jpeg")}
    response = client.post(
        "/classify", files=files, data={"labels": LABELS, "templates": templates}
    )
    assert response.status_code == 200, response.text
    assert response.json()["templates"] == templates


def test_openapi_documents_both_search_bodies(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    classify_form = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert set(classify_form) == {"application/json", "multipart/form-data"}
    assert {"image", "labels", "templates", "label_set"} == set(
        classify_form["multipart/form-data"]["schema"]["properties"]
    )
    for path in ("/knn-service", "/metadata", "/embed"):  # every body is described
        assert "application/json" in spec["paths"][path]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and all(a.startswith("/docs-assets/") for a in assets), assets  # no CDN
    for asset in assets:
        assert client.get(asset).status_code == 200
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "cdn" not in redoc.text.lower()


# --- bad requests ------------------------------------------------------------------------------


def _image(data: bytes) -> dict[str, tuple[str, bytes, str]]:
    return {"image": ("upload.jpg", data, "image/jpeg")}


class ChunkedMultipart:
    """A multipart body streamed without Content-Length, so only counting the bytes can stop it.

    Re-iterable (unlike a generator) so the same case can be sent twice.
    """

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes

    def __iter__(self) -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
        for _ in range(self.total_bytes // 8192):
            yield b"\xff" * 8192
        yield b"\r\n--b--\r\n"


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("search non-image", "/search", {"files": _image(b"not an image")}, 415, "not_an_image"),
    (
        "classify non-image",
        "/classify",
        {"files": _image(b"GIF89a broken"), "data": {"labels": LABELS}},
        415,
        "not_an_image",
    ),
    ("empty text", "/search", {"json": {"text": "   "}}, 422, "validation_error"),
    ("missing text", "/search", {"json": {"k": 3}}, 422, "validation_error"),
    ("text too long", "/search", {"json": {"text": "x" * 201}}, 422, "validation_error"),
    ("k=0", "/search", {"json": {"text": "red", "k": 0}}, 422, "validation_error"),
    ("k>max_k", "/search", {"json": {"text": "red", "k": MAX_K + 1}}, 422, "validation_error"),
    (
        "form k>max_k",
        "/search",
        {"files": _image(png(8)), "data": {"k": str(MAX_K + 1)}},
        422,
        "validation_error",
    ),
    (
        "form k not int",
        "/search",
        {"files": _image(png(8)), "data": {"k": "many"}},
        422,
        "validation_error",
    ),
    (
        "malformed json",
        "/search",
        {"content": b'{"text": "red', "headers": {"content-type": "application/json"}},
        422,
        "validation_error",
    ),
    (
        "unsupported type",
        "/search",
        {"content": b"red circle", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    ("no content type", "/search", {"content": b"red circle"}, 415, "unsupported_media_type"),
    ("classify json no images", "/classify", {"json": {"labels": LABELS}}, 422, "validation_error"),
    (
        "classify text/plain",
        "/classify",
        {"content": b"red", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    ("multipart no image", "/search", {"files": {"k": (None, "3")}}, 422, "validation_error"),
    (
        "multipart no boundary",
        "/search",
        {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
        400,
        "bad_request",
    ),
    (
        "upload over limit",
        "/search",
        {"files": _image(b"\xff" * (MAX_UPLOAD_BYTES + 1))},
        413,
        "too_large",
    ),
    ("body far over limit", "/search", {"files": _image(b"\xff" * (4 << 20))}, 413, "too_large"),
    (
        "chunked over limit",
        "/search",
        {
            "content": ChunkedMultipart(4 << 20),
            "headers": {"content-type": "multipart/form-data; boundary=b"},
        },
        413,
        "too_large",
    ),
    ("too many pixels", "/search", {"files": _image(png(200))}, 413, "image_too_large"),
    ("no labels", "/classify", {"files": _image(png(8))}, 422, "validation_error"),
    (
        "blank labels",
        "/classify",
        {"files": _image(png(8)), "data": {"labels": " , "}},
        422,
        "validation_error",
    ),
    (
        "too many labels",
        "/classify",
        {"files": _image(png(8)), "data": {"labels": [f"l{i}" for i in range(MAX_LABELS + 1)]}},
        422,
        "validation_error",
    ),
    (
        "template without {}",
        "/classify",
        {"files": _image(png(8)), "data": {"labels": LABELS, "templates": ["a photo"]}},
        422,
        "validation_error",
    ),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "type_"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_envelope(
    client: TestClient, path: str, kwargs: dict[str, Any], status: int, type_: str
) -> None:
    assert_envelope(client.post(path, **kwargs), status, type_)


def test_limits_are_named_in_messages(client: TestClient) -> None:
    body = client.post("/search", json={"text": "red", "k": MAX_K + 1}).json()
    assert f"at most {MAX_K}" in body["error"]
    files = _image(png(8))
    body = client.post("/classify", files=files, data={"labels": LABELS, "templates": ["x"]}).json()
    assert "{}" in body["error"]


def test_routing_errors_get_envelope(client: TestClient) -> None:
    assert_envelope(client.get("/nowhere"), 404, "not_found")
    assert_envelope(client.get("/search"), 405, "method_not_allowed")


def test_unexpected_error_is_generic_500(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    body = assert_envelope(TestClient(app).get("/boom"), 500, "internal_error")
    assert "secret" not in body["error"]
    error = assert_openai_envelope(TestClient(app).get("/v1/boom"), 500, "internal_error")
    assert "secret" not in error["message"]


# --- the OpenAI-compatible routes: OpenAI's envelope, so that its clients show the reason ------

TOO_BIG = {"content": b'{"input": "' + b"x" * (1 << 20) + b'"}'}
V1_ERRORS = [  # (id, method, path, kwargs, status, code, param, in the message)
    ("empty-input", "POST", "/v1/embeddings", {"json": {"input": []}}, 422,
     "validation_error", "input", "must not be empty"),
    ("token-id-lists", "POST", "/v1/embeddings", {"json": {"input": [[1, 2], [3]]}}, 422,
     "validation_error", "input", "check_embedding_ctx_length=False"),
    ("token-ids", "POST", "/v1/embeddings", {"json": {"input": [1, 2, 3]}}, 422,
     "validation_error", "input", "check_embedding_ctx_length=False"),
    ("dimensions", "POST", "/v1/embeddings", {"json": {"input": "x", "dimensions": 32}}, 422,
     "validation_error", "dimensions", "have 64 dimensions"),
    ("unknown-field", "POST", "/v1/embeddings", {"json": {"input": "x", "size": 1}}, 422,
     "validation_error", "size", "Extra inputs"),
    ("wrong-model", "POST", "/v1/embeddings", {"json": {"input": "x", "model": "gpt"}}, 404,
     "model_not_found", "model", "'gpt' is not served here"),
    ("retrieve-wrong-model", "GET", "/v1/models/gpt", {}, 404,
     "model_not_found", "model", "'gpt' is not served here"),
    ("too-large", "POST", "/v1/embeddings", TOO_BIG, 413, "too_large", None, "over the limit"),
    ("no-route", "GET", "/v1/nowhere", {}, 404, "not_found", None, "Not Found"),
    ("wrong-method", "GET", "/v1/embeddings", {}, 405, "method_not_allowed", None, "Not Allowed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code", "param", "message"),
    [case[1:] for case in V1_ERRORS],
    ids=[case[0] for case in V1_ERRORS],
)
def test_v1_errors_use_openais_envelope(
    client: TestClient,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
    param: str | None,
    message: str,
) -> None:
    error = assert_openai_envelope(client.request(method, path, **kwargs), status, code, param)
    assert message in error["message"]


def test_v1_401_429_503_use_openais_envelope(settings: Settings) -> None:
    keyed = TestClient(create_app(settings.model_copy(update={"api_key": SecretStr("k")})))
    assert_openai_envelope(keyed.get("/v1/models"), 401, "unauthorized")
    assert_envelope(keyed.get("/indices"), 401, "unauthorized")
    app = create_app(settings)  # no lifespan: not ready

    @app.get("/v1/busy")
    def busy() -> None:
        raise Overloaded("the encode queue is full")

    not_loaded = TestClient(app)
    assert_openai_envelope(not_loaded.get("/v1/models"), 503, "not_ready")
    response = not_loaded.get("/v1/busy")
    assert (
        assert_openai_envelope(response, 429, "overloaded")["message"] == "the encode queue is full"
    )
    assert response.headers["Retry-After"] == str(settings.retry_after_s)


def test_v1_models_retrieve(client: TestClient) -> None:
    (listed,) = client.get("/v1/models").json()["data"]
    response = client.get("/v1/models/duet-micro")
    assert response.status_code == 200 and response.json() == listed


# --- HEAD wherever GET ---------------------------------------------------------------------------

PATH_PARAMETERS = {"name": "default", "index": "default", "id": "0", "model_id": "duet-micro"}
VARYING_HEADERS = {"date", "x-queue-time", "x-inference-time", "x-total-time"}


def get_paths(app: Any) -> list[str]:
    """A URL for every GET route of `app` (path parameters filled in) and one file per mount."""
    paths = []
    for context in iter_route_contexts(app.routes):  # routes of included routers too
        if isinstance(context.route, Mount):
            directory = Path(context.route.app.directory)  # type: ignore[attr-defined]
            name = next(p.name for p in sorted(directory.iterdir()) if p.is_file())
            paths.append(f"{context.path}/{name}")
        elif "GET" in (context.methods or ()):
            paths.append(context.path.format(**PATH_PARAMETERS))
    return paths


def test_every_get_route_answers_head(client: TestClient) -> None:
    paths = get_paths(client.app)
    assert {"/thumbnails/default/0", "/v1/models/duet-micro", "/docs", "/"} <= set(paths)
    for path in paths:
        got, head = client.get(path), client.head(path)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert got.status_code in (200, 307), path  # every path names something that exists
        varying = VARYING_HEADERS | ({"content-length"} if path == "/metrics" else set())
        same = {k: v for k, v in got.headers.items() if k not in varying}  # /metrics: counts grew
        assert {k: v for k, v in head.headers.items() if k not in varying} == same, path
    assert client.head("/search").status_code == 405  # HEAD where GET is, not everywhere


def test_still_serves_after_bad_requests(client: TestClient, samples: list[RawSample]) -> None:
    for case in BAD_REQUESTS:
        client.post(case[1], **case[2])
    response = client.post("/search", json={"text": "red circle", "k": 3})
    assert response.status_code == 200 and len(response.json()["results"]) == 3
    response = client.post("/search", files=_image(samples[5].image))
    assert response.json()["results"][0]["key"] == samples[5].key


def test_cors_is_off_by_default(client: TestClient) -> None:
    """A web page the user visits must not read a key-less local service."""
    headers = {"Origin": "http://any-page.example", "Access-Control-Request-Method": "POST"}
    preflight = client.options("/search", headers=headers)
    assert "access-control-allow-origin" not in preflight.headers
    search = client.post(
        "/search", json={"text": "red circle"}, headers={"Origin": headers["Origin"]}
    )
    assert search.status_code == 200
    assert "access-control-allow-origin" not in search.headers


def test_answers_say_where_their_time_went(client: TestClient) -> None:
    """TEI's timing headers: queue wait and forward passes of this request, and the total;
    the same split in /metrics."""
    search = client.post("/search", json={"text": "red circle", "k": 3})
    assert search.status_code == 200
    queue, inference, total = (
        float(search.headers[name]) for name in ("x-queue-time", "x-inference-time", "x-total-time")
    )
    assert queue >= 0 and inference > 0 and queue + inference <= total
    health = client.get("/health")
    assert float(health.headers["x-inference-time"]) == 0.0  # nothing was encoded
    metrics = client.get("/metrics").text
    assert 'duet_encode_queue_seconds_count{kind="text"}' in metrics
    assert 'duet_encode_inference_seconds_count{kind="text"}' in metrics


def test_a_request_pixel_budget_below_one_image_is_refused(settings: Settings) -> None:
    """A single image is charged per image only: the request budget must hold one at least."""
    with pytest.raises(ValueError, match="max_request_pixels"):
        Settings(**{**settings.model_dump(), "max_request_pixels": settings.max_image_pixels - 1})
