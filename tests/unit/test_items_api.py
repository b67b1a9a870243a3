"""The item routes over HTTP: add by embedding, image (multipart, base64, image_url), get,
delete, batch delete; each update visible to /search when its answer comes; bad items named;
404 / 409 read-only / 507 disk full / 413 cost, with nothing changed by a refused update."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

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
    wait_until_loaded,
    write_lock_held,
)

SAMPLES = 24
DIM = 64  # duet-micro
MAX_ITEMS = 3  # images per request
MAX_UPDATE = 5  # items per add, ids per batch delete
MAX_METADATA_BYTES = 200


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("items")
    artifact = make_artifact(root)
    index = make_index(artifact, make_shard(root / "synth", SAMPLES), root / "built")
    return {"root": root, "artifact": artifact, "index": index}


def fresh_index(built: dict[str, Path], where: Path) -> Path:
    """A copy of the built index at `where`: each app changes its own."""
    shutil.copytree(built["index"], where)
    return where


def settings_for(built: dict[str, Path], index: Path, **update: Any) -> Settings:
    """Index `index` as "default" and, beside it, "plain": 4 vectors and no thumbnails."""
    plain = write_index(
        index.with_name(f"{index.name}-plain"),
        np.eye(4, DIM, dtype=np.float32),
        [(f"p{i}", f"plain {i}", {}) for i in range(4)],
    )
    return Settings(
        artifact_dir=built["artifact"],
        index_dir=index,
        indices={"plain": plain},
        cors_origins=["http://front.example"],
        max_upload_bytes=64 * 1024,
        max_image_pixels=100 * 100,
        max_request_pixels=15_000,
        max_items_per_request=MAX_ITEMS,
        max_update_items=MAX_UPDATE,
        max_item_metadata_bytes=MAX_METADATA_BYTES,
        max_text_chars=200,
        image_url_fetch=True,
        image_url_allowed_networks=["127.0.0.1/32"],
        **update,
    )


@pytest.fixture(scope="module")
def client(built: dict[str, Path]) -> Iterator[TestClient]:
    index = fresh_index(built, built["root"] / "served")
    with TestClient(create_app(settings_for(built, index))) as test_client:
        assert wait_until_loaded(test_client).status_code == 200
        yield test_client


def service_of(client: TestClient) -> Service:
    service = client.app.state.service.service  # type: ignore[attr-defined]
    assert service is not None
    return service


def count(client: TestClient, index: str = "default") -> int:
    with service_of(client).indices.lease(index) as loaded:
        return loaded.count


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM)
    return vector / np.linalg.norm(vector)


def add(client: TestClient, items: list[dict[str, Any]], index: str = "default") -> list[int]:
    response = client.post(f"/indices/{index}/items", json={"items": items})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index"] == index and len(body["ids"]) == len(items)
    assert [item["id"] for item in body["items"]] == body["ids"]
    return body["ids"]


def search(client: TestClient, **query: Any) -> list[dict[str, Any]]:
    response = client.post("/search", json=query)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def top_of(client: TestClient, **query: Any) -> dict[str, Any]:
    return search(client, k=1, **query)[0]


# --- add ---------------------------------------------------------------------------------------


def test_added_embedding_is_found_by_the_next_search(client: TestClient) -> None:
    before = count(client)
    vector = unit(1)
    metadata = {"album": "holiday", "year": 2025, "tags": ["sea", "sun"]}
    (new_id,) = add(
        client,
        [{"embedding": (3.0 * vector).tolist(), "caption": "by vector", "metadata": metadata}],
    )
    assert new_id >= SAMPLES and count(client) == before + 1
    top = top_of(client, embedding=vector.tolist())  # the very next request
    assert top["id"] == new_id and top["score"] == pytest.approx(1.0, abs=1e-5)  # normalised
    assert top["caption"] == "by vector" and top["metadata"] == metadata
    item = client.get(f"/indices/default/items/{new_id}").json()
    assert item == {
        "index": "default",
        "id": new_id,
        "key": "",
        "caption": "by vector",
        "url": None,
        "metadata": metadata,
    }  # no thumbnail_url: an embedding has no picture


def test_added_items_metadata_is_filterable_at_once(client: TestClient) -> None:
    """A field no built item has becomes filterable with the add; a delete takes it away."""
    metadata = {"album": "paris-2031", "year": 2031}
    (new_id,) = add(client, [{"embedding": unit(2).tolist(), "metadata": metadata}])
    query = {"embedding": unit(3).tolist(), "k": 5}
    found = search(client, **query, filter={"album": "paris-2031", "year": {"gte": 2031}})
    assert [hit["id"] for hit in found] == [new_id]
    indices = client.get("/indices").json()["indices"]
    assert indices[0]["filterable"]["album"] == "string"
    client.delete(f"/indices/default/items/{new_id}")
    assert search(client, **query, filter={"album": "paris-2031"}) == []


def test_added_images_multipart_and_base64_are_found_and_have_thumbnails(
    client: TestClient,
) -> None:
    red, teal = png(24, (250, 10, 10)), png(24, (10, 200, 190))
    response = client.post(
        "/indices/default/items",
        files=[
            ("image", ("red.png", red, "image/png")),
            ("image", ("teal.png", teal, "image/png")),
        ],
        data={"caption": ["red", "teal"], "metadata": ['{"color": "red"}', '{"color": "teal"}']},
    )
    assert response.status_code == 200, response.text
    by_form = response.json()
    (by_json,) = add(client, [{"image": b64(teal), "caption": "teal again", "key": "t.png"}])
    red_id, teal_id = by_form["ids"]
    assert by_json not in (red_id, teal_id)
    for data, new_ids in ((red, {red_id}), (teal, {teal_id, by_json})):
        hits = search(client, image=b64(data), k=2)
        if len(new_ids) == 1:
            assert hits[0]["id"] in new_ids
        else:
            assert {hit["id"] for hit in hits} == new_ids
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # the stored vector is /embed's: the same decode and encode as every image route
    embedded = client.post("/embed", json={"images": [b64(red)]}).json()["image_embeddings"][0]
    assert top_of(client, embedding=embedded)["id"] == red_id
    item = client.get(f"/indices/default/items/{red_id}").json()
    assert item["caption"] == "red" and item["metadata"] == {"color": "red"}
    for url in (item["thumbnail_url"], by_form["items"][1]["thumbnail_url"]):
        thumbnail = client.get(url)
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/webp"
    assert client.get(f"/indices/default/items/{by_json}").json()["key"] == "t.png"


def test_an_image_added_to_an_index_without_thumbnails_has_none(client: TestClient) -> None:
    picture = png(16, (120, 40, 160))
    response = client.post("/indices/plain/items", json={"items": [{"image": b64(picture)}]})
    assert response.status_code == 200, response.text
    (added,) = response.json()["items"]
    assert "thumbnail_url" not in added
    item = client.get(f"/indices/plain/items/{added['id']}").json()
    assert item["id"] == added["id"] and "thumbnail_url" not in item
    top = top_of(client, image=b64(picture), index="plain")
    assert top["id"] == added["id"] and "thumbnail_url" not in top


def test_cross_origin_pages_may_delete(client: TestClient) -> None:
    preflight = client.options(
        "/indices/default/items/0",
        headers={"Origin": "http://front.example", "Access-Control-Request-Method": "DELETE"},
    )
    assert preflight.status_code == 200
    assert "DELETE" in preflight.headers["access-control-allow-methods"]


class OneImage(http.server.BaseHTTPRequestHandler):
    image: ClassVar[bytes] = png(20, (30, 30, 220))

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *args: Any) -> None:
        pass


def test_added_image_url_is_fetched_and_stored_as_the_url(client: TestClient) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OneImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/blue.png"
        (new_id,) = add(client, [{"image_url": url, "caption": "fetched"}])
    finally:
        server.shutdown()
    top = top_of(client, image=b64(OneImage.image))
    assert top["id"] == new_id and top["url"] == url
    assert client.get(f"/indices/default/items/{new_id}").json()["url"] == url


def test_head_answers_like_get_without_a_body(client: TestClient) -> None:
    head = client.head("/indices/default/items/0")
    assert head.status_code == 200 and head.content == b""
    assert client.head("/indices/default/items/999999").status_code == 404


# --- delete ------------------------------------------------------------------------------------


def test_deleted_item_is_gone_from_search_and_get(client: TestClient) -> None:
    vector = unit(2)
    (new_id,) = add(client, [{"embedding": vector.tolist(), "caption": "short-lived"}])
    assert top_of(client, embedding=vector.tolist())["id"] == new_id
    before = count(client)
    response = client.delete(f"/indices/default/items/{new_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"index": "default", "deleted": [new_id], "not_found": []}
    assert count(client) == before - 1
    assert new_id not in {hit["id"] for hit in search(client, embedding=vector.tolist(), k=10)}
    assert_envelope(client.get(f"/indices/default/items/{new_id}"), 404, "not_found")
    assert_envelope(client.delete(f"/indices/default/items/{new_id}"), 404, "not_found")


def test_a_built_item_can_be_deleted(client: TestClient) -> None:
    """Ids of the snapshot (row positions) are item ids too."""
    assert client.get("/indices/default/items/7").status_code == 200
    assert client.delete("/indices/default/items/7").status_code == 200
    assert_envelope(client.post("/search", json={"id": 7}), 404, "not_found")
    hits = search(client, text="a shape", k=SAMPLES)
    assert 7 not in {hit["id"] for hit in hits}


def test_batch_delete_reports_unknown_ids(client: TestClient) -> None:
    first, second = add(client, [{"embedding": unit(3).tolist()}, {"embedding": unit(4).tolist()}])
    unknown = 10**12
    response = client.post(
        "/indices/default/items/delete", json={"ids": [first, unknown, second, first]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert sorted(body["deleted"]) == sorted([first, second]) and body["not_found"] == [unknown]
    again = client.post("/indices/default/items/delete", json={"ids": [first]}).json()
    assert again["deleted"] == [] and again["not_found"] == [first]


def test_updates_waiting_for_the_index_leave_the_threadpool_to_other_requests(
    client: TestClient,
) -> None:
    """More adds than the threadpool has threads wait while the index holds its updates; a
    plain-`def` route (GET an item) still answers, and every add goes through afterwards."""
    adds = 50  # the threadpool has 40 threads
    statuses: list[int] = []
    item = {"items": [{"embedding": unit(6).tolist()}]}

    def post() -> None:
        statuses.append(client.post("/indices/default/items", json=item).status_code)

    before = count(client)
    threads = [threading.Thread(target=post) for _ in range(adds)]
    with service_of(client).indices.lease() as index, index.paused_writes():
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # the adds reach the index and wait there
        got: list[int] = []
        reader = threading.Thread(
            target=lambda: got.append(client.get("/indices/default/items/0").status_code)
        )
        reader.start()
        reader.join(20)
        assert got == [200], "a read waited for updates held by the index"
        assert statuses == []  # held: none answered yet
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * adds and count(client) == before + adds


def test_searches_never_fail_while_items_are_added_and_deleted(client: TestClient) -> None:
    """Searchers by text, image and vector run while a writer adds and deletes over HTTP: every
    answer is 200, and each added item is found by the writer's very next search."""
    stop = threading.Event()
    statuses: list[int] = []
    queries = [{"text": "a red circle"}, {"image": b64(png(16))}, {"embedding": unit(7).tolist()}]

    def searcher(query: dict[str, Any]) -> None:
        while not stop.is_set():
            statuses.append(client.post("/search", json={**query, "k": 5}).status_code)

    threads = [threading.Thread(target=searcher, args=(query,)) for query in queries]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(15):
            vector = unit(100 + round_)
            (new_id,) = add(client, [{"embedding": vector.tolist()}])
            assert top_of(client, embedding=vector.tolist())["id"] == new_id
            assert client.delete(f"/indices/default/items/{new_id}").status_code == 200
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert len(statuses) >= 15 and set(statuses) == {200}


# --- refusals: nothing changes -----------------------------------------------------------------


def truncated_png(size: int) -> bytes:
    """A PNG whose header is whole (size x size) and whose pixels are cut off."""
    data = png(size)
    return data[:60]


GOOD = {"embedding": [1.0] + [0.0] * (DIM - 1)}
BAD_ADDS: list[tuple[str, list[dict[str, Any]], int, str, str]] = [
    ("short embedding", [GOOD, {"embedding": [1.0, 2.0]}], 422, "validation_error",
     "body.items.1.embedding"),
    ("zero embedding", [{"embedding": [0.0] * DIM}], 422, "validation_error",
     "body.items.0.embedding"),
    ("two sources", [GOOD, GOOD, {**GOOD, "image": b64(png(8))}], 422, "validation_error",
     "body.items.2"),
    ("no source", [{"caption": "nothing"}], 422, "validation_error", "body.items.0"),
    ("metadata not an object", [{**GOOD, "metadata": [1, 2]}], 422, "validation_error",
     "body.items.0.metadata"),
    ("metadata too large", [GOOD, {**GOOD, "metadata": {"x": "y" * MAX_METADATA_BYTES}}], 422,
     "validation_error", "body.items.1.metadata"),
    ("caption too long", [{**GOOD, "caption": "c" * 201}], 422, "validation_error",
     "body.items.0.caption"),
    ("unknown field", [{**GOOD, "album": "x"}], 422, "validation_error", "body.items.0.album"),
    ("bad base64", [GOOD, {"image": "not base64!"}], 422, "validation_error",
     "body.items.1.image"),
    ("not an image", [GOOD, {"image": b64(b"hello")}], 415, "not_an_image", "body.items.1.image"),
    ("undecodable image", [{"image": b64(png(8))}, {"image": b64(truncated_png(40))}], 415,
     "not_an_image", "body.items.1.image"),
    ("image too large", [{"image": b64(png(8))}, {"image": b64(png(120))}], 413,
     "image_too_large", "body.items.1.image"),
    ("too many images", [{"image": b64(png(8))}] * (MAX_ITEMS + 1), 422, "validation_error",
     "max_items_per_request"),
    ("too many items", [GOOD] * (MAX_UPDATE + 1), 413, "too_large", "max_update_items"),
    ("empty", [], 422, "validation_error", "body.items"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("items", "status", "type_", "named"),
    [case[1:] for case in BAD_ADDS],
    ids=[case[0] for case in BAD_ADDS],
)
def test_a_bad_item_refuses_the_whole_add_and_is_named(
    client: TestClient, items: list[dict[str, Any]], status: int, type_: str, named: str
) -> None:
    before = count(client)
    body = assert_envelope(
        client.post("/indices/default/items", json={"items": items}), status, type_
    )
    assert named in body["error"]
    assert count(client) == before  # the good items of the batch were not added either


def test_metadata_numbers_must_be_finite(client: TestClient) -> None:
    """NaN is no JSON: stored, it would be answered as JSON no client parses."""
    embedding = ", ".join(["1"] + ["0"] * (DIM - 1))
    body = f'{{"items": [{{"embedding": [{embedding}], "metadata": {{"x": NaN}}}}]}}'
    before = count(client)
    response = client.post(
        "/indices/default/items", content=body, headers={"content-type": "application/json"}
    )
    assert "body.items.0.metadata" in assert_envelope(response, 422, "validation_error")["error"]
    assert count(client) == before


def test_request_pixels_are_charged_before_any_decode(client: TestClient) -> None:
    """Two 100 x 100 headers pass max_image_pixels alone but not max_request_pixels together.
    The first cannot be decoded: a 413 (not its 415) shows nothing was decoded first."""
    items = [{"image": b64(truncated_png(100))}, {"image": b64(png(100))}]
    before = count(client)
    body = assert_envelope(
        client.post("/indices/default/items", json={"items": items}), 413, "image_too_large"
    )
    assert "max_request_pixels" in body["error"] or "15000" in body["error"]
    assert count(client) == before


BAD_FORMS: list[tuple[str, dict[str, Any], str]] = [
    ("captions for some images", {"caption": ["only one"]}, "body.caption"),
    ("metadata not JSON", {"metadata": ["{nope", "{}"]}, "body.metadata.0"),
    ("metadata not an object", {"metadata": ["{}", "[1]"]}, "body.metadata.1"),
    ("caption too long", {"caption": ["ok", "c" * 201]}, "body.items.1.caption"),
    ("metadata not finite", {"metadata": ["{}", '{"x": Infinity}']}, "body.items.1.metadata"),
]


@pytest.mark.parametrize(
    ("data", "named"), [c[1:] for c in BAD_FORMS], ids=[c[0] for c in BAD_FORMS]
)
def test_bad_multipart_fields_are_named(
    client: TestClient, data: dict[str, Any], named: str
) -> None:
    files = [("image", (f"{i}.png", png(8), "image/png")) for i in range(2)]
    before = count(client)
    response = client.post("/indices/default/items", files=files, data=data)
    assert named in assert_envelope(response, 422, "validation_error")["error"]
    assert count(client) == before


def test_more_files_than_images_per_request_is_named(client: TestClient) -> None:
    files = [("image", (f"{i}.png", png(8), "image/png")) for i in range(MAX_ITEMS + 1)]
    response = client.post("/indices/default/items", files=files)
    assert "max_items_per_request" in assert_envelope(response, 422, "validation_error")["error"]


def test_unknown_index_and_id_are_404(client: TestClient) -> None:
    assert_envelope(client.post("/indices/nope/items", json={"items": [GOOD]}), 404, "not_found")
    assert_envelope(client.get("/indices/nope/items/0"), 404, "not_found")
    assert_envelope(client.delete("/indices/nope/items/0"), 404, "not_found")
    assert_envelope(client.post("/indices/nope/items/delete", json={"ids": [0]}), 404, "not_found")
    assert_envelope(client.get("/indices/default/items/999999"), 404, "not_found")
    assert_envelope(client.get("/indices/default/items/-1"), 422, "validation_error")
    assert_envelope(client.get("/indices/default/items/x"), 422, "validation_error")


def test_batch_delete_limits(client: TestClient) -> None:
    over = {"ids": list(range(MAX_UPDATE + 1))}
    before = count(client)
    body = assert_envelope(
        client.post("/indices/default/items/delete", json=over), 413, "too_large"
    )
    assert "max_update_items" in body["error"]
    assert count(client) == before
    bad_bodies: list[dict[str, Any]] = [{"ids": []}, {"ids": [True]}, {"ids": [1.0]}, {}]
    for bad in [*bad_bodies, {"ids": ["1"]}]:
        response = client.post("/indices/default/items/delete", json=bad)
        assert_envelope(response, 422, "validation_error")


def test_add_needs_json_or_multipart(client: TestClient) -> None:
    response = client.post(
        "/indices/default/items", content=b"x", headers={"content-type": "text/plain"}
    )
    assert_envelope(response, 415, "unsupported_media_type")


def test_item_routes_need_the_api_key(built: dict[str, Path], tmp_path: Path) -> None:
    index = fresh_index(built, tmp_path / "keyed")
    settings = settings_for(built, index, api_key=SecretStr("s3cret"))
    with TestClient(create_app(settings)) as keyed:
        assert wait_until_loaded(keyed).status_code == 200
        for method, path in [
            ("POST", "/indices/default/items"),
            ("GET", "/indices/default/items/0"),
            ("DELETE", "/indices/default/items/0"),
            ("POST", "/indices/default/items/delete"),
        ]:
            assert_envelope(keyed.request(method, path), 401, "unauthorized")
        assert count(keyed) == SAMPLES
        headers = {"X-API-Key": "s3cret"}
        response = keyed.post("/indices/default/items", json={"items": [GOOD]}, headers=headers)
        assert response.status_code == 200, response.text
        item = keyed.get("/indices/default/items/0", headers=headers).json()
        assert "sig=" in item["thumbnail_url"]  # an <img> loads it without the key
        assert keyed.get(item["thumbnail_url"]).status_code == 200


# --- a read-only index, a full disk ------------------------------------------------------------


def test_index_written_by_another_process_is_read_only(
    built: dict[str, Path], tmp_path: Path
) -> None:
    index = fresh_index(built, tmp_path / "shared")
    with write_lock_held(index), TestClient(create_app(settings_for(built, index))) as reader:
        assert wait_until_loaded(reader).status_code == 200
        refused = [
            reader.post("/indices/default/items", json={"items": [GOOD]}),
            # refused before the body is read: no image is decoded for nothing
            reader.post("/indices/default/items", json={"items": [{"embedding": [1.0]}]}),
            reader.post(
                "/indices/default/items", files=[("image", ("a.png", png(8), "image/png"))]
            ),
            reader.delete("/indices/default/items/3"),
            reader.post("/indices/default/items/delete", json={"ids": [3]}),
        ]
        for response in refused:
            message = assert_envelope(response, 409, "read_only")["error"]
            assert "a test's lock holder" in message  # who writes it instead
        assert count(reader) == SAMPLES
        assert reader.get("/indices/default/items/3").status_code == 200  # reads still work
        assert len(search(reader, text="a shape", k=3)) == 3


def test_full_disk_is_507_and_changes_nothing(built: dict[str, Path], tmp_path: Path) -> None:
    """The index on a small tmpfs; once the disk is full, an add is refused with 507 and
    nothing is searchable; with space again, the same add succeeds."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        index = fresh_index(built, mount / "index")
        with TestClient(create_app(settings_for(built, index))) as full:
            assert wait_until_loaded(full).status_code == 200
            filler = fill(mount / "filler")
            vector = unit(5)
            item = {"embedding": vector.tolist(), "caption": "no room"}
            for _ in range(2):  # a refused write leaves the journal usable
                response = full.post("/indices/default/items", json={"items": [item]})
                assert_envelope(response, 507, "insufficient_storage")
            assert_envelope(full.delete("/indices/default/items/1"), 507, "insufficient_storage")
            assert count(full) == SAMPLES
            assert top_of(full, embedding=vector.tolist())["caption"] != "no room"
            assert full.get("/indices/default/items/1").status_code == 200
            filler.unlink()
            (new_id,) = add(full, [item])
            assert top_of(full, embedding=vector.tolist())["id"] == new_id
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(path: Path) -> Path:
    """Write `path` until the file system has no space left."""
    with open(path, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return path


def test_openapi_documents_the_item_routes_with_examples(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/indices/{name}/items"]) == {"post"}
    # HEAD is answered wherever GET is, app-wide (serve.head), so not documented per route
    assert set(paths["/indices/{name}/items/{id}"]) == {"get", "delete"}
    assert set(paths["/indices/{name}/items/delete"]) == {"post"}
    add_body = paths["/indices/{name}/items"]["post"]["requestBody"]["content"]
    assert add_body["application/json"]["example"]["items"][0]["image"]
    assert "multipart/form-data" in add_body
    statuses = set(paths["/indices/{name}/items"]["post"]["responses"])
    assert {"200", "404", "409", "413", "415", "422", "429", "507"} <= statuses
    example = paths["/indices/{name}/items/delete"]["post"]["requestBody"]["content"]
    assert example["application/json"]["example"] == {"ids": [3, 24]}
    # the documented example works when sent as it is
    sent = client.post("/indices/default/items", json=add_body["application/json"]["example"])
    assert sent.status_code == 200, sent.text


def test_get_shows_a_built_items_metadata_whatever_it_holds(
    built: dict[str, Path], tmp_path: Path
) -> None:
    """A built index's metadata is not an added item's: no size limit, NaN answered as null."""
    metadata = {"width": float("nan"), "notes": "n" * (2 * MAX_METADATA_BYTES)}
    index = write_index(
        tmp_path / "odd", np.eye(2, DIM, dtype=np.float32), [("k", "c", metadata)] * 2
    )
    with TestClient(create_app(settings_for(built, index))) as odd:
        assert wait_until_loaded(odd).status_code == 200
        response = odd.get("/indices/default/items/1")
        assert response.status_code == 200, response.text
        assert response.json()["metadata"] == {"width": None, "notes": metadata["notes"]}
