"""Thumbnails: made upright and small at build time, packed, merged in row order, served by
GET /thumbnails with cache headers and signed URLs (one build, one id as written, until they
expire), linked from /search, inlined for clip-retrieval's front; indices built without them
still load. The API key, not ASCII here, is matched by its UTF-8 bytes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from serve.app import create_app
from serve.auth import thumbnail_url
from serve.indexing.build import build_index
from serve.indexing.index import SearchIndex, write_index
from serve.indexing.thumbnails import PackWriter, ThumbnailSpec, make_thumbnail, merge_packs
from serve.settings import Settings
from tests.serve_support import assert_envelope, make_artifact, make_index, make_shard
from tests.unit.test_sources import img2dataset_parquet, photo_folder

KEY = "thumb-clé"  # not ASCII: sent as its UTF-8 bytes
KEY_UTF8 = KEY.encode("utf-8")
TTL_S = 3600  # the default thumbnail_url_ttl_s
SAMPLES = 12


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- making and packing -------------------------------------------------------------------


def test_thumbnail_is_upright_small_and_never_enlarged() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90° clockwise to show it
    photo = io.BytesIO()
    Image.new("RGB", (600, 300), (200, 10, 10)).save(photo, format="JPEG", exif=exif)
    image = Image.open(io.BytesIO(photo.getvalue()))
    image.load()
    thumb = decoded(make_thumbnail(image, ThumbnailSpec(max_side_px=64)))
    assert thumb.format == "WEBP" and thumb.size == (32, 64)  # turned upright, longest side 64
    tiny = decoded(make_thumbnail(Image.new("RGB", (20, 10)), ThumbnailSpec(format="jpeg")))
    assert tiny.format == "JPEG" and tiny.size == (20, 10)
    with pytest.raises(ValueError, match="format"):
        ThumbnailSpec(format="gif")


def test_packs_merge_in_the_given_order(tmp_path: Path) -> None:
    packs = []
    for rank, items in enumerate([[b"a0", b"", b"a2"], [b"b0", b"b1"]]):
        writer = PackWriter(tmp_path / f"part-{rank}.bin")
        for item in items:
            writer.add(item)
        packs.append(writer.close())
    merged = merge_packs(packs, np.array([3, 0, 4, 1, 2]), tmp_path / "thumbnails.bin")
    data = merged.path.read_bytes()
    pieces = [data[a:b] for a, b in zip(merged.offsets[:-1], merged.offsets[1:], strict=True)]
    assert pieces == [b"b0", b"a0", b"b1", b"", b"a2"]


# --- building ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("thumbs")
    artifact = make_artifact(root)
    shard = make_shard(root / "synth", SAMPLES)
    mixed = f"{shard}::{photo_folder(root / 'photos')}::{img2dataset_parquet(root / 'p.parquet')}"
    old = write_index(root / "old", np.eye(3, 64, dtype=np.float32), [("o", "old", {})] * 3)
    manifest = json.loads((old / "index.json").read_text())  # as written before thumbnails
    del manifest["build_id"]
    (old / "index.json").write_text(json.dumps(manifest))
    return {
        "root": root,
        "artifact": artifact,
        "index": make_index(artifact, shard, root / "index"),
        "rebuilt": make_index(artifact, shard, root / "rebuilt"),
        "shard": shard,
        "mixed": build_index(artifact, mixed, root / "mixed", batch_size=8)["out"],
        "old": old,
    }


def test_build_stores_one_thumbnail_per_row_with_its_origin(built: dict[str, Any]) -> None:
    index = SearchIndex.load(built["mixed"])
    try:
        assert index.thumbnails is not None
        assert index.manifest["thumbnails"]["format"] == "webp"
        rows = index.rows(range(index.count))
        for row_id in range(index.count):
            assert decoded(index.thumbnails.get(row_id) or b"").format == "WEBP"
        shard_row, folder_row, parquet_row = rows[0], rows[SAMPLES], rows[index.count - 1]
        assert shard_row.meta["shard"] == "shard-000000.tar"
        assert shard_row.meta["member"] == f"{shard_row.key}.jpg"
        assert folder_row.meta["folder"] == "photos" and "source" in folder_row.meta
        assert parquet_row.meta["parquet"] == "p.parquet"
        assert parquet_row.meta["row"] == 4 and parquet_row.meta["key"] == "000000004"
        assert parquet_row.meta["url"] == "https://example.com/4.jpg"
        assert index.thumbnails.get(index.count) is None
    finally:
        index.close()
    assert not Path(f"{built['mixed']}.parts").exists()


def test_thumbnails_none_builds_without_them(built: dict[str, Any], tmp_path: Path) -> None:
    shard = str(Path(built["root"]) / "synth" / "train" / "shard-000000.tar")
    out = build_index(
        built["artifact"], shard, tmp_path / "bare", thumbnails=ThumbnailSpec(format="none")
    )
    index = SearchIndex.load(out["out"])
    assert index.thumbnails is None and "thumbnails" not in index.manifest
    assert not (tmp_path / "bare" / "thumbnails.bin").exists()
    index.close()


# --- serving ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(built: dict[str, Any]) -> Iterator[TestClient]:
    settings = Settings(
        artifact_dir=built["artifact"],
        index_dir=built["index"],
        indices={"old": built["old"], "rebuilt": built["rebuilt"]},
        api_key=SecretStr(KEY),
    )
    with TestClient(create_app(settings), headers={"X-API-Key": KEY_UTF8}) as test_client:
        while test_client.get("/ready").status_code != 200:
            pass
        yield test_client


@pytest.fixture(scope="module")
def anonymous(client: TestClient) -> TestClient:
    """The same app without the key, as an `<img>` tag asks."""
    return TestClient(client.app)


def search(client: TestClient, **body: Any) -> list[dict[str, Any]]:
    response = client.post("/search", json={"text": "a red circle", "k": 3, **body})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, strict_parsing=True))


def with_query(url: str, **changes: str) -> str:
    """`url` with some query values replaced, order kept."""
    return f"{urlsplit(url).path}?{urlencode({**query_of(url), **changes})}"


def max_age_s(response: httpx.Response) -> int:
    """The `max-age` of a `private, max-age=N, immutable` answer."""
    cache = response.headers["cache-control"]
    assert cache.startswith("private, max-age=") and cache.endswith(", immutable"), cache
    return int(cache.removeprefix("private, max-age=").removesuffix(", immutable"))


def reference_signature(index: str, row_id: str, version: str, expires_s: str) -> str:
    """The signature as docs/api.md defines it, computed here independently of serve.auth."""
    message = f'["thumbnail", "{index}", "{row_id}", "{version}", {expires_s}]'.encode()
    return hmac.new(KEY.encode("utf-8"), message, hashlib.sha256).hexdigest()[:32]


def test_search_links_signed_thumbnails_that_load_without_the_key(
    client: TestClient, anonymous: TestClient
) -> None:
    before_s = time.time()
    results = search(client)
    after_s = time.time()
    url = results[0]["thumbnail_url"]
    query = query_of(url)
    assert urlsplit(url).path == f"/thumbnails/default/{results[0]['id']}"
    assert list(query) == ["v", "exp", "sig"]
    # valid for at least the TTL and at most twice it, on a grid: repeats give the same URL
    assert before_s + TTL_S < int(query["exp"]) <= after_s + 2 * TTL_S
    assert int(query["exp"]) % TTL_S == 0
    assert query["sig"] == reference_signature("default", str(results[0]["id"]), query["v"],
                                               query["exp"])  # fmt: skip
    again = search(client)[0]["thumbnail_url"]  # the same, unless a window ended in between
    assert again == url or int(query_of(again)["exp"]) == int(query["exp"]) + TTL_S
    response = anonymous.get(url)  # as an <img> tag: no key, the URL's signature instead
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert TTL_S - 60 <= max_age_s(response) <= int(query["exp"]) - before_s  # not past exp
    etag = response.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert decoded(response.content).format == "WEBP"
    forged = ("1" if query["sig"][0] == "0" else "0") + query["sig"][1:]  # never the same
    assert_envelope(anonymous.get(with_query(url, sig=forged)), 401, "unauthorized")
    other = url.replace(f"/default/{results[0]['id']}?", f"/default/{results[1]['id']}?")
    assert_envelope(anonymous.get(other), 401, "unauthorized")  # one URL, one thumbnail
    plain = client.get(f"/thumbnails/default/{results[0]['id']}")  # with the key itself
    assert plain.status_code == 200 and "no-cache" in plain.headers["cache-control"]
    keyed = client.get(f"/thumbnails/default/{results[0]['id']}?v={query['v']}")
    assert keyed.headers["cache-control"] == "private, max-age=31536000, immutable"


def test_if_none_match_follows_rfc_9110(client: TestClient, anonymous: TestClient) -> None:
    url = search(client)[0]["thumbnail_url"]
    first = anonymous.get(url)
    etag = first.headers["etag"]
    for header in [etag, "*", f"W/{etag}", f'"other", {etag}', f'W/"a,b", , W/{etag}']:
        response = anonymous.get(url, headers={"If-None-Match": header})
        assert response.status_code == 304, header
        assert response.content == b""
        assert response.headers["etag"] == etag
        assert max_age_s(response) in range(max_age_s(first) - 5, max_age_s(first) + 1)
    for header in ['"other"', 'W/"other", "x"', etag[:-2] + '"', "garbage"]:
        response = anonymous.get(url, headers={"If-None-Match": header})
        assert response.status_code == 200 and response.content == first.content, header
    missing = client.get("/thumbnails/default/999999", headers={"If-None-Match": "*"})
    assert_envelope(missing, 404, "not_found")  # `*` matches only a thumbnail that exists


@pytest.mark.parametrize(
    ("path", "status", "kind"),
    [
        ("/thumbnails/default/999999", 404, "not_found"),
        ("/thumbnails/nope/0", 404, "not_found"),
        ("/thumbnails/..%2Findex/0", 404, "not_found"),
        ("/thumbnails/default/0?sig=" + "f" * 65, 422, "validation_error"),
        ("/thumbnails/default/0?v=earlier", 404, "not_found"),
        ("/thumbnails/old/0", 404, "not_found"),
        (f"/thumbnails/default/{2**63}", 404, "not_found"),  # well written, no such row
        (f"/thumbnails/default/{10**19}", 422, "validation_error"),
        ("/thumbnails/default/-1", 422, "validation_error"),
        ("/thumbnails/default/x", 422, "validation_error"),
        # ids only as thumbnail_url writes them: canonical decimal
        ("/thumbnails/default/%201", 422, "validation_error"),
        ("/thumbnails/default/1%20", 422, "validation_error"),
        ("/thumbnails/default/1.0", 422, "validation_error"),
        ("/thumbnails/default/+1", 422, "validation_error"),
        ("/thumbnails/default/%2B1", 422, "validation_error"),
        ("/thumbnails/default/01", 422, "validation_error"),
        ("/thumbnails/default/1e0", 422, "validation_error"),
        ("/thumbnails/default/%EF%BC%91", 422, "validation_error"),  # a fullwidth digit one
        # the query: v, exp, sig, each at most once, nothing else
        ("/thumbnails/default/1?v=a&v=b", 422, "validation_error"),
        ("/thumbnails/default/1?sig=a&sig=b", 422, "validation_error"),
        ("/thumbnails/default/1?exp=1&exp=1", 422, "validation_error"),
        ("/thumbnails/default/1?v=a&%76=b", 422, "validation_error"),
        ("/thumbnails/default/1?size=large", 422, "validation_error"),
        ("/thumbnails/default/1?x=1&x=2", 422, "validation_error"),
        ("/thumbnails/default/1?exp=%2B1", 422, "validation_error"),
        ("/thumbnails/default/1?exp=1.5", 422, "validation_error"),
    ],
)
def test_thumbnail_errors_use_the_envelope(
    client: TestClient, path: str, status: int, kind: str
) -> None:
    assert_envelope(client.get(path), status, kind)


@pytest.mark.parametrize(
    "path", ["/thumbnails/default/1", "/thumbnails/nope/0", "/thumbnails/default/01",
             "/thumbnails/default/1?v=x", "/thumbnails/default/1?v=x&exp=9999999999"]
)  # fmt: skip
def test_without_access_every_thumbnail_answer_is_401(anonymous: TestClient, path: str) -> None:
    response = anonymous.get(path)  # whether an index or id exists is not told either
    assert_envelope(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_signed_url_opens_one_id_as_written(client: TestClient, anonymous: TestClient) -> None:
    hit = search(client)[0]
    url = hit["thumbnail_url"]
    for spelling in [f"0{hit['id']}", f"%20{hit['id']}", f"{hit['id']}.0"]:
        assert_envelope(
            anonymous.get(url.replace(f"/{hit['id']}?", f"/{spelling}?")), 401, "unauthorized"
        )


def test_repeated_query_parameters_are_refused(client: TestClient, anonymous: TestClient) -> None:
    url = search(client)[0]["thumbnail_url"]
    query = query_of(url)
    for extra in [f"v={query['v']}", f"sig={query['sig']}", f"exp={query['exp']}", "v=other"]:
        assert_envelope(anonymous.get(f"{url}&{extra}"), 422, "validation_error")
    assert_envelope(anonymous.get(f"{url}&cache=1"), 422, "validation_error")


def test_expired_or_tampered_expiry_is_refused(client: TestClient, anonymous: TestClient) -> None:
    hit = search(client)[0]
    url = hit["thumbnail_url"]
    version, expires_s = query_of(url)["v"], int(query_of(url)["exp"])
    later = anonymous.get(with_query(url, exp=str(expires_s + TTL_S)))  # extended by hand
    assert "signature" in assert_envelope(later, 401, "unauthorized")["error"]
    past_s = int(time.time()) - 1
    expired = thumbnail_url("default", hit["id"], version, KEY, past_s)  # signed, but past
    assert query_of(expired)["sig"] == reference_signature("default", str(hit["id"]), version,
                                                           str(past_s))  # fmt: skip
    assert "expired" in assert_envelope(anonymous.get(expired), 401, "unauthorized")["error"]
    soon = thumbnail_url("default", hit["id"], version, KEY, int(time.time()) + 30)
    response = anonymous.get(soon)
    assert response.status_code == 200
    assert max_age_s(response) <= 30
    for drop in ["exp", "v"]:  # a signature alone is not a URL
        partial = {k: v for k, v in query_of(url).items() if k != drop}
        response = anonymous.get(f"{urlsplit(url).path}?{urlencode(partial)}")
        assert_envelope(response, 401, "unauthorized")


def test_a_rebuilt_index_hands_out_new_urls_and_drops_the_old(
    client: TestClient, anonymous: TestClient, built: dict[str, Any]
) -> None:
    before = search(client, index="rebuilt")[0]["thumbnail_url"]
    assert anonymous.get(before).status_code == 200
    make_index(built["artifact"], built["shard"], built["rebuilt"])
    assert client.post("/indices/rebuilt/reload").status_code == 200
    after = search(client, index="rebuilt")[0]["thumbnail_url"]
    current = query_of(after)["v"]
    assert current != query_of(before)["v"] and anonymous.get(after).status_code == 200
    assert_envelope(anonymous.get(before), 404, "not_found")  # that build's thumbnails are gone
    assert_envelope(client.get(before), 404, "not_found")
    # the old URL made to name the current build: its signature was for the old one
    assert_envelope(anonymous.get(f"{before}&v={current}"), 422, "validation_error")
    assert_envelope(anonymous.get(f"{before.replace('?', f'?v={current}&')}"), 422,
                    "validation_error")  # fmt: skip
    assert_envelope(anonymous.get(with_query(before, v=current)), 401, "unauthorized")


def get_raw(client: TestClient, path: str, headers: dict[str, bytes]) -> httpx.Response:
    """GET from the client's app with these header bytes exactly, as a server hands them over
    (the test client would re-encode header bytes that are not UTF-8 as UTF-8)."""

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as raw:
            return await raw.get(path, headers=headers)

    return client.portal.call(get)  # on the app's own event loop


def test_the_key_is_matched_by_its_utf8_bytes(client: TestClient) -> None:
    mojibake = KEY_UTF8.decode("latin-1").encode("utf-8")  # UTF-8 bytes read as latin-1
    for path in ["/indices", "/thumbnails/default/1"]:  # the middleware and the thumbnail route
        assert get_raw(client, path, {"X-API-Key": KEY_UTF8}).status_code == 200, path
        bearer = {"Authorization": b"Bearer " + KEY_UTF8}
        assert get_raw(client, path, bearer).status_code == 200, path
        for wrong in [KEY.encode("latin-1"), mojibake, KEY_UTF8 + b"x", KEY_UTF8[:-1]]:
            response = get_raw(client, path, {"X-API-Key": wrong})
            message = assert_envelope(response, 401, "unauthorized")["error"]
            assert message == "the API key is not valid", (path, wrong)


@pytest.mark.parametrize("key", ["", " padded", "line\nbreak", "tab\tin", "\udcff"])
def test_a_key_no_header_can_carry_is_refused_at_start(built: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match="api_key"):
        Settings(artifact_dir=built["artifact"], index_dir=built["index"], api_key=SecretStr(key))


def test_an_index_without_thumbnails_still_loads_and_links_none(client: TestClient) -> None:
    results = search(client, index="old")
    assert results and all("thumbnail_url" not in result for result in results)


def test_clip_retrieval_results_inline_thumbnails_and_omit_null_urls(client: TestClient) -> None:
    body = b'{"text": "a red circle", "num_images": 3, "num_result_ids": 5}'
    results = client.post("/knn-service", content=body).json()
    for result in results[:3]:
        assert "url" not in result  # the front would show a null url as the address "null"
        assert decoded(base64.b64decode(result["image"])).format == "WEBP"
    assert "image" not in results[3]
    metadata = client.post("/metadata", content=f'{{"ids": [{results[4]["id"]}]}}'.encode()).json()
    assert "image" in metadata[0]["metadata"] and "url" not in metadata[0]["metadata"]
