"""clip-retrieval compatibility: requests as its ClipClient and web front send them; image_url."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import json
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve import fetch
from serve.app import create_app
from serve.indexing.index import write_index
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

SAMPLES = 16
MAX_K = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("clip-retrieval")
    shard = make_shard(root / "synth", SAMPLES)
    artifact = make_artifact(root)
    settings = Settings(
        artifact_dir=artifact,
        indices={"synth": make_index(artifact, shard, root / "index")},
        max_k=MAX_K,
        max_upload_bytes=64 * 1024,
    )
    return {"settings": settings, "samples": read_samples(shard)}


@pytest.fixture(scope="module")
def client(setup: dict[str, Any]) -> Iterator[TestClient]:
    with TestClient(create_app(setup["settings"])) as test_client:
        assert wait_until_loaded(test_client).status_code == 200
        yield test_client


def client_body(**query: Any) -> bytes:
    """The body ClipClient posts (json.dumps, every key, unused ones null), as bytes."""
    body = {
        "text": None,
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "deduplicate": True,
        "use_safety_model": True,
        "use_violence_detector": True,
        "indice_name": "synth",
        "use_mclip": False,
        "aesthetic_score": 9,
        "aesthetic_weight": 0.5,
        "modality": "image",
        "num_images": 4,
        "num_result_ids": 4,
    }
    body.update(query)
    return json.dumps(body).encode()


def post(client: TestClient, path: str, body: bytes) -> Any:
    """POST without a Content-Type header, as clip-retrieval's client and front do."""
    response = client.post(path, content=body)
    assert "content-type" not in response.request.headers
    return response


def test_text_query_as_clip_client_sends_it(client: TestClient) -> None:
    response = post(client, "/knn-service", client_body(text="a red circle"))
    assert response.status_code == 200, response.text
    results = response.json()
    # deduplicate=True (ClipClient's default) may drop near-copies among a random tiny model's
    # results, so up to num_images come back, each id once
    assert isinstance(results, list) and 1 <= len(results) <= 4
    assert len({r["id"] for r in results}) == len(results)
    for result in results:
        assert {"id", "similarity", "caption", "key", "image"} <= set(result)
        assert "url" not in result and isinstance(result["caption"], str)  # no web URL: none
    similarities = [r["similarity"] for r in results]
    assert similarities == sorted(similarities, reverse=True)
    ignored = response.headers["x-duet-ignored"].split(",")
    assert ignored == [
        "use_safety_model",
        "use_violence_detector",
        "aesthetic_score",
        "aesthetic_weight",
    ]


def test_image_query_returns_ids_beyond_num_images_without_metadata(
    client: TestClient, setup: dict[str, Any]
) -> None:
    sample = setup["samples"][2]
    body = client_body(
        image=b64(sample.image),
        num_images=2,
        num_result_ids=6,
        deduplicate=False,
        use_safety_model=False,
        use_violence_detector=False,
        aesthetic_score="",
        aesthetic_weight="",
    )  # the web front's shape: empty strings for unset aesthetic options
    response = post(client, "/knn-service", body)
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 6 and "x-duet-ignored" not in response.headers
    assert results[0]["key"] == sample.key and results[0]["similarity"] == pytest.approx(
        1, abs=1e-4
    )
    assert all("caption" in r for r in results[:2])
    assert all(set(r) == {"id", "similarity"} for r in results[2:])
    metadata = post(
        client,
        "/metadata",
        json.dumps(
            {"ids": [r["id"] for r in results[2:]] + [999], "indice_name": "synth"}
        ).encode(),
    )
    assert metadata.status_code == 200
    assert [m["id"] for m in metadata.json()] == [r["id"] for r in results[2:]]  # 999 left out
    assert all(m["metadata"]["caption"] for m in metadata.json())


def test_embedding_input_default_index_and_clamping(client: TestClient) -> None:
    vector = client.post("/embed", json={"texts": ["a blue square"]}).json()["text_embeddings"][0]
    by_text = post(
        client, "/knn-service", client_body(text="a blue square", deduplicate=False)
    ).json()
    body = client_body(
        embedding_input=vector, indice_name=None, deduplicate=False, num_result_ids=50
    )
    response = post(client, "/knn-service", body)
    assert response.status_code == 200, response.text
    assert response.headers["x-duet-clamped"] == f"num_result_ids={MAX_K}"
    results = response.json()
    assert len(results) == MAX_K and [r["id"] for r in results[:4]] == [r["id"] for r in by_text]


def test_modality_text_is_ignored_and_said_so(client: TestClient) -> None:
    response = post(
        client, "/knn-service", client_body(text="a star", modality="text", use_safety_model=False)
    )
    assert response.status_code == 200
    assert "modality" in response.headers["x-duet-ignored"].split(",")


def test_indices_list(client: TestClient) -> None:
    assert client.get("/indices-list").json() == ["synth"]


BAD: list[tuple[str, bytes, int, str]] = [
    ("no query", client_body(), 422, "validation_error"),
    ("text and image", client_body(text="a", image=b64(png(8))), 422, "validation_error"),
    ("unknown index", client_body(text="a", indice_name="laion5B"), 404, "not_found"),
    ("not json", b"text=a red circle", 422, "validation_error"),
    ("image_url when off", client_body(image_url="http://example.com/a.jpg"), 400, "bad_request"),
    ("bad modality", client_body(text="a", modality="audio"), 422, "validation_error"),
    ("wrong embedding size", client_body(embedding_input=[0.1, 0.2]), 422, "validation_error"),
]


@pytest.mark.parametrize(("body", "status", "type_"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_knn_requests(client: TestClient, body: bytes, status: int, type_: str) -> None:
    assert_envelope(post(client, "/knn-service", body), status, type_)


# --- image_url -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata endpoints
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        # IPv6 forms that carry an IPv4 address are judged by it
        ("::ffff:8.8.8.8", True),  # IPv4-mapped
        ("::ffff:10.0.0.1", False),
        ("::ffff:0:8.8.8.8", True),  # IPv4-translated (SIIT)
        ("::ffff:0:127.0.0.1", False),
        ("::8.8.8.8", True),  # IPv4-compatible
        ("::127.0.0.1", False),
        ("::", False),
        ("64:ff9b::8.8.8.8", True),  # NAT64, well-known prefix
        ("64:ff9b::127.0.0.1", False),
        ("64:ff9b::169.254.169.254", False),
        ("64:ff9b:1::7f00:1", False),  # NAT64 local-use, /96 layout
        ("64:ff9b:1:7f00:1::", False),  # NAT64 local-use, /48 layout
        ("64:ff9b:1:c0a8:1::", False),
        ("2002:808:808::1", True),  # 6to4
        ("2002:7f00:1::1", False),
        ("2002:a9fe:a9fe::", False),
        ("2001:0:808:808::f7f7:f7f7", True),  # Teredo: server 8.8.8.8, client 8.8.8.8
        ("2001:0:808:808::80ff:fffe", False),  # client 127.0.0.1
        ("2001:0:a00:1::f7f7:f7f7", False),  # server 10.0.0.1
    ],
)
def test_public_address_check(address: str, public: bool) -> None:
    assert fetch.is_public_address(address) is public


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/a.jpg",
        "http://localhost/a.jpg",
        "http://[::1]/a.jpg",
        "ftp://example.com/a",
        "file:///etc/passwd",
        "http://10.0.0.1/a.jpg",
    ],
)
def test_image_url_to_private_hosts_or_other_schemes_is_refused(
    client: TestClient, setup: dict[str, Any], url: str
) -> None:
    app = client.app
    app.state.settings = setup["settings"].model_copy(update={"image_url_fetch": True})  # type: ignore[attr-defined]
    try:
        body = assert_envelope(
            post(client, "/knn-service", client_body(image_url=url)), 400, "bad_request"
        )
    finally:
        app.state.settings = setup["settings"]  # type: ignore[attr-defined]
    assert "non-public" in body["error"] or "http://" in body["error"]


class ImageServer(http.server.BaseHTTPRequestHandler):
    """Serves /image.png, /big (over the limit), /redirect-out (to another loopback address)."""

    image = png(16)
    accept_encodings: ClassVar[list[str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        ImageServer.accept_encodings.append(self.headers.get("Accept-Encoding", ""))
        if self.path.startswith("/encoded/") or self.path == "/bomb":
            self._send_encoded(self.path.removeprefix("/encoded/"))
            return
        if self.path == "/trickle":  # one byte every 0.2 s: each read is quick, the whole is not
            self.send_response(200)
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
            return
        if self.path == "/redirect-out":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.server.server_port}/image.png")
            self.end_headers()
            return
        data = self.image if self.path == "/image.png" else b"\xff" * 100_000
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()  # no Content-Length: the size limit must count
        self.wfile.write(data)

    def _send_encoded(self, codings: str) -> None:
        """The image (or, for /bomb, 100 MB of zeros) in `codings`, applied left to right."""
        data, header = self.image, codings.replace("rawdeflate", "deflate")
        if codings == "/bomb":
            data, codings, header = bytes(100_000_000), "gzip,gzip", "gzip, gzip"
        for coding in codings.split(","):
            if coding == "gzip":
                data = gzip.compress(data)
            elif coding in ("deflate", "rawdeflate"):
                packer = zlib.compressobj(wbits=15 if coding == "deflate" else -15)
                data = packer.compress(data) + packer.flush()
        self.send_response(200)
        self.send_header("Content-Encoding", header)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def fetch_image(url: str, **limits: Any) -> bytes:
    return asyncio.run(fetch.fetch_image(url, **limits))


@pytest.fixture
def image_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An ImageServer's URL; only 127.0.0.1 counts as public, so it stands in for a web host."""
    monkeypatch.setattr(fetch, "is_public_address", lambda address: address == "127.0.0.1")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_fetch_image_reads_within_limits_and_rechecks_redirects(image_server: str) -> None:
    base = image_server
    assert fetch_image(f"{base}/image.png", max_bytes=10_000, timeout_s=5) == ImageServer.image
    with pytest.raises(fetch.FetchError, match="over the limit") as too_large:
        fetch_image(f"{base}/big", max_bytes=10_000, timeout_s=5)
    assert too_large.value.status == 413
    with pytest.raises(fetch.FetchError, match="non-public"):
        fetch_image(f"{base}/redirect-out", max_bytes=10_000, timeout_s=5)
    start = time.monotonic()
    with pytest.raises(fetch.FetchError, match="too long") as slow:
        fetch_image(f"{base}/trickle", max_bytes=10_000, timeout_s=1.0)
    assert slow.value.status == 400
    assert time.monotonic() - start < 2.0  # the limit is on the whole download


def test_fetch_image_decodes_content_codings_within_the_limit(image_server: str) -> None:
    base = image_server
    for path in ("gzip", "gzip,gzip", "deflate", "rawdeflate"):
        assert fetch_image(f"{base}/encoded/{path}", max_bytes=10_000, timeout_s=5) == (
            ImageServer.image
        ), path
    with pytest.raises(fetch.FetchError, match="over the limit") as bomb:
        fetch_image(f"{base}/bomb", max_bytes=10_000, timeout_s=5)
    assert bomb.value.status == 413
    with pytest.raises(fetch.FetchError, match="Content-Encoding br") as unknown:
        fetch_image(f"{base}/encoded/br", max_bytes=10_000, timeout_s=5)
    assert unknown.value.status == 400
    assert ImageServer.accept_encodings and set(ImageServer.accept_encodings) == {"identity"}


def test_allowed_networks_admit_only_their_addresses() -> None:
    allowed = fetch.parse_networks(["127.0.0.0/8", "fd00::/8"])
    assert fetch.is_allowed_address("127.0.0.5", allowed)
    assert fetch.is_allowed_address("fd00::1", allowed)
    assert fetch.is_allowed_address("8.8.8.8", allowed)
    assert not fetch.is_allowed_address("10.0.0.1", allowed)
    assert not fetch.is_allowed_address("::1", allowed)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:65536/", "http://[::1/", "http://host:port/", "https://[zz::1]/"]
)
def test_unparseable_image_urls_are_400(url: str) -> None:
    with pytest.raises(fetch.FetchError, match="not a valid URL") as refused:
        fetch_image(url, max_bytes=10_000, timeout_s=1)
    assert refused.value.status == 400


def test_metadata_answers_are_built_one_at_a_time(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent /metadata requests all get their answers, but never two are built at once:
    several megabyte answers built together would crowd every other request out."""
    from serve.routes import clip_retrieval

    building, most = [0], [0]
    build = clip_retrieval._metadata_answer

    def counted(*args: Any) -> bytes:
        building[0] += 1
        most[0] = max(most[0], building[0])
        try:
            time.sleep(0.05)  # long enough for the other requests to arrive meanwhile
            return build(*args)
        finally:
            building[0] -= 1

    monkeypatch.setattr(clip_retrieval, "_metadata_answer", counted)
    answers: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(
                client.post("/metadata", json={"ids": [0, 1]}).status_code
            )
        )
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == [200] * 6
    assert most[0] == 1


def test_stored_nan_metadata_is_answered_as_null(tmp_path: Path) -> None:
    """An index built from JSON holding NaN (Python's json reads and writes it): /knn-service
    answered 500 and /metadata sent `NaN`, which no strict JSON parser reads."""
    setup = make_artifact(tmp_path)
    vectors = np.eye(3, 64, dtype=np.float32)
    rows = [(f"k{i}", "c", {"x": float("nan"), "y": float("inf"), "n": i}) for i in range(3)]
    index = write_index(tmp_path / "index", vectors, rows)
    with TestClient(create_app(Settings(artifact_dir=setup, index_dir=index))) as nan_client:
        wait_until_loaded(nan_client)

        def strict(response: Any) -> Any:
            assert response.status_code == 200, response.text
            return json.loads(response.text, parse_constant=pytest.fail)

        knn = {"embedding_input": vectors[0].tolist(), "num_images": 2}
        found = strict(nan_client.post("/knn-service", json=knn))
        assert found[0]["x"] is None and found[0]["y"] is None and found[0]["n"] == 0
        (first,) = strict(nan_client.post("/metadata", json={"ids": [0]}))
        assert first["metadata"]["x"] is None
