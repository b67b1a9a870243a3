"""The items of a named index, changed while it serves: add (images or embeddings), get, delete.

    POST   /indices/{name}/items          JSON {"items": [{image | image_url | embedding,
                                          caption, key, metadata}, ...]}, or multipart `image`
                                          files (+ one `caption`, `key`, `metadata` per image)
                                          -> {"ids": [...], "items": [{id, key, thumbnail_url}]}
    GET    /indices/{name}/items/{id}     (and HEAD) -> key, caption, url, metadata, thumbnail_url
    DELETE /indices/{name}/items/{id}     -> {"deleted": [id], "not_found": []}; 404 if none
    POST   /indices/{name}/items/delete   {"ids": [...]} -> {"deleted": [...], "not_found": [...]}

An add is charged before its expensive work, in this order: the index exists (404) and may be
written by this process (409), every item's fields (422 naming the item:
`body.items.3.embedding: ...`) and the batch's size (`max_update_items`, 413), then, with no
image decoded yet, every image's header (413/415 naming the item), then the decode and encode
queues (429) as for any image. Images take /search's path (serve/images.py), whose one decode
also makes the thumbnail when the index keeps them; an embedding is checked and normalised as
/search's is. `SearchIndex.add` / `delete` make the update durable before the answer (with
`DUET_VECTOR_STORE=qdrant`, `QdrantIndex`'s: applied by Qdrant, no journal of ours); their
refusals map to 409 read_only, 507 insufficient_storage and 503 unavailable in serve/errors.py.
They enter the threadpool one at a time (`Service.index_updates`): an index applies one update
at a time anyway, and a burst of updates waiting on its lock there would hold the threadpool's
threads from every other request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from serve.auth import thumbnail_expiry_s, thumbnail_url
from serve.body import (
    decode_base64_off_loop,
    json_response,
    media_type,
    read_form,
    read_json,
    read_uploads,
    validate,
)
from serve.errors import ApiError, error_responses
from serve.images import download_image, prepare_images_for
from serve.indexing.index import IndexRow
from serve.indexing.journal import IndexReadOnlyError
from serve.indexing.store import ServedIndex
from serve.item_schemas import (
    AddedItem,
    AddItemsRequest,
    AddItemsResponse,
    DeleteItemsRequest,
    DeleteItemsResponse,
    ItemResponse,
    NewItem,
)
from serve.schemas import EXAMPLE_IMAGE_BASE64, INT64_MAX
from serve.service import Service, ServiceDep, SettingsDep, embedding_query, service_of, settings_of
from serve.settings import Settings

router = APIRouter(tags=["items"])

IndexName = Annotated[str, PathParam(max_length=200, description="Index name (GET /indices).")]
ItemId = Annotated[
    int, PathParam(ge=0, le=INT64_MAX, description="Item id, from an add or a search.")
]
FORM_FIELDS = ("caption", "key", "metadata")  # beside the `image` files: none, or one per image

ADD_BODY_DOC = {
    "required": True,
    "content": {
        "application/json": {
            "schema": AddItemsRequest.model_json_schema(),
            "example": {
                "items": [
                    {
                        "image": EXAMPLE_IMAGE_BASE64,
                        "caption": "a small red square",
                        "metadata": {"album": "shapes"},
                    }
                ]
            },
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "images to add: repeat the field",
                    },
                    "caption": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "none, or one per image, in order",
                    },
                    "key": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "none, or one per image, in order",
                    },
                    "metadata": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "none, or one JSON object per image, in order",
                    },
                },
            },
            "encoding": {name: {"style": "form", "explode": True} for name in FORM_FIELDS},
        },
    },
}


@dataclass(slots=True)
class ItemInput:
    """One item of an add as read from the body: image bytes (or a URL still to fetch) or an
    embedding, and what is stored beside it."""

    where: str  # how errors name it: "body.items.3"
    caption: str
    key: str
    metadata: dict[str, Any]
    image: bytes | None = None
    image_url: str | None = None
    embedding: list[float] | None = None
    thumbnail: bytes | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return self.image_url or ""


def check_batch(count: int, what: str, settings: Settings) -> None:
    """413 when one update names more than `max_update_items` items."""
    if count > settings.max_update_items:
        raise ApiError(
            413,
            "too_large",
            f"{count} {what} in one request; the limit is {settings.max_update_items} "
            "(max_update_items): send them in several requests",
        )


async def read_items(request: Request, settings: Settings) -> list[ItemInput]:
    """The items of an add, by content type; base64 decoded, nothing else done yet."""
    kind = media_type(request)
    if kind == "application/json":
        parsed = await read_json(request, AddItemsRequest, settings)
        check_batch(len(parsed.items), "items", settings)
        return [
            await json_item(item, f"body.items.{i}", settings)
            for i, item in enumerate(parsed.items)
        ]
    if kind == "multipart/form-data":
        return await form_items(request, settings)
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {kind or '(none)'!r} is not supported: send application/json "
        '{"items": [{"image": ...}, {"embedding": [...]}]} or multipart/form-data with "image" '
        "files",
    )


async def json_item(item: NewItem, where: str, settings: Settings) -> ItemInput:
    image = None
    if item.image is not None:
        image = await decode_base64_off_loop(item.image, f"{where}.image", settings)
    return ItemInput(
        where,
        item.caption,
        item.key,
        item.metadata,
        image=image,
        image_url=item.image_url,
        embedding=item.embedding,
    )


async def form_items(request: Request, settings: Settings) -> list[ItemInput]:
    """Multipart: `image` files, and `caption`, `key`, `metadata` fields none or one per image."""
    try:
        form = await read_form(request, settings, max_files=settings.max_items_per_request)
    except HTTPException as exc:  # Starlette's parser: too many files, or a malformed body
        if "Too many files" in str(exc.detail):
            raise ApiError(
                422,
                "validation_error",
                f"body.image: more than {settings.max_items_per_request} images in one request "
                "(max_items_per_request)",
            ) from None
        raise
    try:
        files = await read_uploads(form, "image", settings)
        fields = {name: form_values(form, name, len(files)) for name in FORM_FIELDS}
    finally:
        await form.close()
    items = [
        {"image": "-", **{name: values[i] for name, values in fields.items() if values}}
        for i in range(len(files))
    ]
    for i, item in enumerate(items):
        if "metadata" in item:
            item["metadata"] = form_metadata(item["metadata"], f"body.metadata.{i}")
    # validated with placeholders for the files: the same limits as JSON, one place
    parsed = validate(AddItemsRequest, {"items": items}, settings)
    return [
        ItemInput(f"body.items.{i}", item.caption, item.key, item.metadata, image=data)
        for i, (item, data) in enumerate(zip(parsed.items, files, strict=True))
    ]


def form_values(form: FormData, name: str, images: int) -> list[str]:
    """Form field `name`'s values: none, or exactly one per image (else 422)."""
    values = [value for value in form.getlist(name) if isinstance(value, str)]
    if values and len(values) != images:
        raise ApiError(
            422,
            "validation_error",
            f"body.{name}: {len(values)} values for {images} images; give none or one per image",
        )
    return values


def form_metadata(text: str, where: str) -> Any:
    """A form's metadata field: JSON text of an object (else 422)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(422, "validation_error", f"{where}: not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(422, "validation_error", f"{where}: must be a JSON object")
    return value


def given_vectors(items: list[ItemInput], dim: int) -> dict[int, np.ndarray]:
    """The items' own embeddings as [1, dim] unit vectors by position; 422 naming the item."""
    return {
        i: embedding_query(item.embedding, dim, f"{item.where}.embedding")
        for i, item in enumerate(items)
        if item.embedding is not None
    }


async def image_vectors(
    items: list[ItemInput], service: Service, settings: Settings, index: ServedIndex
) -> dict[int, np.ndarray]:
    """The items' images fetched, decoded, encoded (and thumbnailed) as [1, D] by position.

    URLs are fetched one at a time, each within the upload and time limits, and all of them
    together within `max_request_bytes`, as uploads are."""
    positions = [i for i, item in enumerate(items) if item.embedding is None]
    fetched_bytes = 0
    for i in positions:
        item = items[i]
        if item.image is None and item.image_url is not None:
            item.image = await download_image(item.image_url, settings)
            fetched_bytes += len(item.image)
            if fetched_bytes > settings.max_request_bytes:
                raise ApiError(
                    413,
                    "too_large",
                    f"{item.where}.image_url: the downloaded images are over "
                    f"{settings.max_request_bytes} bytes together (max_request_bytes)",
                )
    files = [items[i].image for i in positions]
    prepared = await prepare_images_for(
        [data for data in files if data is not None],
        service,
        settings,
        thumbnail_spec=index.thumbnail_spec,
        names=[f"{items[i].where}.image" for i in positions],
    )
    if not prepared:
        return {}
    for i, image in zip(positions, prepared, strict=True):
        items[i].thumbnail = image.thumbnail
    vectors = await service.batcher.encode_images([image.pixels for image in prepared])
    return {i: vectors[j : j + 1] for j, i in enumerate(positions)}


def thumbnail_links(name: str, index: ServedIndex, settings: Settings) -> Callable[[int], str]:
    """Item id -> its thumbnail's URL, as search results give it (signed under a key)."""
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    expires_s = thumbnail_expiry_s(settings.thumbnail_url_ttl_s)
    version = index.build_id
    return lambda item_id: thumbnail_url(name, item_id, version, api_key, expires_s)


@router.post(
    "/indices/{name}/items",
    response_model=AddItemsResponse,
    summary="Add images or embeddings to index `name`; searchable when the answer comes",
    responses=error_responses(400, 401, 404, 409, 413, 415, 422, 429, 503, 507),
    openapi_extra={"requestBody": ADD_BODY_DOC},
)
async def add_items(name: IndexName, request: Request) -> Response:
    """JSON `{"items": [{"image": BASE64, "caption": ..., "metadata": {...}}, {"embedding":
    [...]}]}` or multipart `image` files. The new ids come back in the items' order; the items
    are stored durably and found by searches once this answers."""
    start = time.perf_counter()
    service, settings = service_of(request), settings_of(request)
    with service.indices.lease(name) as index:  # 404, then 409, before the body is read
        if not index.writable:
            raise IndexReadOnlyError(index.read_only_reason)
    items = await read_items(request, settings)
    with service.indices.lease(name) as index:
        vectors = given_vectors(items, index.dim)  # cheap checks before any image work
        vectors.update(await image_vectors(items, service, settings, index))
        stacked = np.concatenate([vectors[i] for i in range(len(items))]).astype(np.float32)
        rows = [IndexRow(item.key, item.caption, item.metadata, item.url) for item in items]
        thumbnails = (
            [item.thumbnail for item in items] if index.thumbnail_spec is not None else None
        )
        async with service.index_updates:
            ids = await run_in_threadpool(index.add, stacked, rows, thumbnails)
        link = thumbnail_links(name, index, settings) if index.thumbnails is not None else None
    added = [
        AddedItem(id=i, key=item.key, thumbnail_url=link(i) if link and item.thumbnail else None)
        for i, item in zip(ids, items, strict=True)
    ]
    took_ms = round((time.perf_counter() - start) * 1000, 2)
    return json_response(AddItemsResponse(index=name, ids=ids, items=added, took_ms=took_ms))


@router.get(
    "/indices/{name}/items/{id}",
    response_model=ItemResponse,
    summary="One item of index `name`: key, caption, url, metadata, thumbnail URL",
    responses=error_responses(401, 404, 422, 503),
)
def get_item(name: IndexName, id: ItemId, service: ServiceDep, settings: SettingsDep) -> Response:
    """Plain `def`: one metadata read and, with thumbnails, one `os.pread` (the threadpool)."""
    with service.indices.lease(name) as index:
        try:
            row = index.get(id)
        except KeyError:
            raise ApiError(404, "not_found", f"no item with id {id} in index {name!r}") from None
        has_thumbnail = index.thumbnails is not None and index.thumbnails.get(id) is not None
        link = thumbnail_links(name, index, settings)(id) if has_thumbnail else None
    body = ItemResponse(
        index=name,
        id=id,
        key=row.key,
        caption=row.caption,
        url=row.url or None,
        metadata=row.meta,
        thumbnail_url=link,
    )
    return json_response(body)


@router.delete(
    "/indices/{name}/items/{id}",
    response_model=DeleteItemsResponse,
    summary="Delete item `id` of index `name`; gone from searches when the answer comes",
    responses=error_responses(401, 404, 409, 422, 503, 507),
)
async def delete_item(name: IndexName, id: ItemId, service: ServiceDep) -> Response:
    with service.indices.lease(name) as index:
        async with service.index_updates:
            deleted, not_found = await run_in_threadpool(index.delete, [id])
    if not_found:
        raise ApiError(404, "not_found", f"no item with id {id} in index {name!r}")
    return json_response(DeleteItemsResponse(index=name, deleted=deleted, not_found=[]))


@router.post(
    "/indices/{name}/items/delete",
    response_model=DeleteItemsResponse,
    summary="Delete several items of index `name`; says which ids were not there",
    responses=error_responses(401, 404, 409, 413, 422, 503, 507),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": DeleteItemsRequest.model_json_schema(),
                    "example": {"ids": [3, 24]},
                }
            },
        }
    },
)
async def delete_items(name: IndexName, request: Request) -> Response:
    """`{"ids": [3, 24]}`: every id that is live is deleted, in one durable update; the others
    come back in `not_found` (not an error)."""
    service, settings = service_of(request), settings_of(request)
    name = service.indices.resolve(name)
    body = await read_json(request, DeleteItemsRequest, settings)
    check_batch(len(body.ids), "ids", settings)
    ids = list(dict.fromkeys(body.ids))  # each once, in the order sent
    with service.indices.lease(name) as index:
        async with service.index_updates:
            deleted, not_found = await run_in_threadpool(index.delete, ids)
    return json_response(DeleteItemsResponse(index=name, deleted=deleted, not_found=not_found))
