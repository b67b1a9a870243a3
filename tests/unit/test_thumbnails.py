"""Thumbnails: made upright and small at build time, packed, merged in row order, served by
GET /thumbnails with cache headers and signed URLs, linked from /search, inlined for
clip-retrieval's front; indices built without them still load."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from serve.app import create_app
from serve.build_index import build_index
from serve.index import SearchIndex, write_index
from serve.settings import Settings
from serve.thumbnails import PackWriter, ThumbnailSpec, make_thumbnail, merge_packs
from tests.serve_support import assert_envelope, make_artifact, make_index, make_shard
from tests.unit.test_sources import img2dataset_parquet, photo_folder

KEY = "thumb-test-key"
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
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as test_client:
        while test_client.get("/ready").status_code != 200:
            pass
        yield test_client


def search(client: TestClient, **body: Any) -> list[dict[str, Any]]:
    response = client.post("/search", json={"text": "a red circle", "k": 3, **body})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_search_links_signed_thumbnails_that_load_without_the_key(client: TestClient) -> None:
    results = search(client)
    url = results[0]["thumbnail_url"]
    assert url.startswith(f"/thumbnails/default/{results[0]['id']}?v=") and "&sig=" in url
    anonymous = TestClient(client.app)
    response = anonymous.get(url)  # as an <img> tag: no key, the URL's signature instead
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert "immutable" in response.headers["cache-control"]
    assert response.headers["cache-control"].startswith("private")
    etag = response.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert decoded(response.content).format == "WEBP"
    assert anonymous.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert_envelope(anonymous.get(url.replace("sig=", "sig=0")), 401, "unauthorized")
    other = url.replace(f"/default/{results[0]['id']}?", f"/default/{results[1]['id']}?")
    assert_envelope(anonymous.get(other), 401, "unauthorized")  # one URL, one thumbnail
    plain = client.get(f"/thumbnails/default/{results[0]['id']}")  # with the key itself
    assert plain.status_code == 200 and "no-cache" in plain.headers["cache-control"]


@pytest.mark.parametrize(
    ("path", "status", "kind"),
    [
        ("/thumbnails/default/999999", 404, "not_found"),
        ("/thumbnails/nope/0", 404, "not_found"),
        ("/thumbnails/..%2Findex/0", 404, "not_found"),
        ("/thumbnails/default/0?sig=" + "f" * 65, 422, "validation_error"),
        ("/thumbnails/default/0?v=earlier", 404, "not_found"),
        ("/thumbnails/old/0", 404, "not_found"),
        (f"/thumbnails/default/{2**63}", 422, "validation_error"),
        ("/thumbnails/default/-1", 422, "validation_error"),
        ("/thumbnails/default/x", 422, "validation_error"),
    ],
)
def test_thumbnail_errors_use_the_envelope(
    client: TestClient, path: str, status: int, kind: str
) -> None:
    assert_envelope(client.get(path), status, kind)


def test_a_rebuilt_index_hands_out_new_urls_and_drops_the_old(
    client: TestClient, built: dict[str, Any]
) -> None:
    before = search(client, index="rebuilt")[0]["thumbnail_url"]
    assert client.get(before).status_code == 200
    make_index(built["artifact"], built["shard"], built["rebuilt"])
    assert client.post("/indices/rebuilt/reload").status_code == 200
    after = search(client, index="rebuilt")[0]["thumbnail_url"]
    assert after != before and client.get(after).status_code == 200
    assert_envelope(client.get(before), 404, "not_found")  # that build's thumbnails are gone


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
