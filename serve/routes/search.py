"""POST /search: the top k of a named index for a text, an image, an embedding or an indexed id."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from serve import retrieval
from serve.auth import thumbnail_expiry_s, thumbnail_url
from serve.body import (
    decode_base64_off_loop,
    json_response,
    media_type,
    read_form,
    read_json,
    read_upload,
    validate,
)
from serve.errors import ApiError, error_responses
from serve.images import prepare_images
from serve.indexing.index import Hit
from serve.indexing.store import ServedIndex
from serve.schemas import ImageSearchForm, SearchHit, SearchRequest, SearchResponse
from serve.service import (
    QuerySource,
    Service,
    embedding_query,
    filter_query,
    search_with,
    service_of,
    settings_of,
)
from serve.settings import Settings

router = APIRouter(tags=["search"])

REQUEST_BODY_DOC = {
    "required": True,
    "content": {
        "application/json": {
            "schema": SearchRequest.model_json_schema(),
            "example": {"text": "red circle", "k": 5},
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "query image"},
                    "k": {"type": "integer", "minimum": 1, "description": "number of results"},
                    "index": {"type": "string", "description": "index name"},
                    "dedup": {"type": "number", "description": "near-duplicate threshold"},
                    "filter": {"type": "string", "description": "the filter object as JSON"},
                },
            }
        },
    },
}


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A parsed search: exactly one of `text`, `image` (undecoded bytes), `embedding`, `id`."""

    k: int
    index: str | None = None
    dedup: float | None = None
    text: str | None = None
    image: bytes | None = None
    embedding: list[float] | None = None
    id: int | None = None
    filter: Any = None
    """the client's filter object, parsed against the index once it is known"""


async def search_query(request: Request, settings: Settings) -> SearchQuery:
    """Read the body by its content type; async because it only awaits the bytes."""
    kind = media_type(request)
    if kind == "application/json":
        parsed = await read_json(request, SearchRequest, settings)
        image = (
            None
            if parsed.image is None
            else await decode_base64_off_loop(parsed.image, "body.image", settings)
        )
        return SearchQuery(
            k=parsed.k or settings.default_k,
            index=parsed.index,
            dedup=parsed.dedup,
            text=parsed.text,
            image=image,
            embedding=parsed.embedding,
            id=parsed.id,
            filter=parsed.filter,
        )
    if kind == "multipart/form-data":
        form = await read_form(request, settings)
        try:
            image = await read_upload(form, "image", settings)
            fields = validate(
                ImageSearchForm,
                {name: form.get(name) for name in ("k", "index", "dedup", "filter")},
                settings,
            )
        finally:
            await form.close()
        return SearchQuery(
            k=fields.k or settings.default_k,
            index=fields.index,
            dedup=fields.dedup,
            image=image,
            filter=_form_filter(fields.filter),
        )
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {kind or '(none)'!r} is not supported: send application/json with "
        '{"text": ...} (or image, embedding, id) or multipart/form-data with an "image" file',
    )


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Search an index by text, image, embedding or indexed id",
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 503),
    openapi_extra={"requestBody": REQUEST_BODY_DOC},
)
async def search(request: Request) -> Response:
    """JSON `{"text": "red circle", "k": 5}` (or `image`, `embedding`, `id`), or multipart `image`.

    Async: a text or image is encoded and searched on the batcher's thread (`search_with`), so
    the event loop only routes. The hottest route takes the bare request instead of dependencies
    and serialises its answer once (`json_response`): FastAPI's dependency solving and response
    re-validation cost ~0.3 ms a request, a tenth of a tiny model's encode + search.
    """
    start = time.perf_counter()
    service, settings = service_of(request), settings_of(request)
    query = await search_query(request, settings)
    name = service.indices.resolve(query.index)
    with service.indices.lease(name) as index:
        where = filter_query(index, query.filter, settings, "body.filter")

        def find(vector: np.ndarray) -> list[Hit]:
            return retrieval.search(
                index,
                vector,
                query.k,
                dedup_threshold=query.dedup,
                overfetch=settings.dedup_overfetch,
                exclude_id=query.id,
                where=where,
            )

        source = await query_source(service, index, query, settings)
        hits = await search_with(service, source, find, in_threadpool=index.searches_in_threadpool)
    took_ms = (time.perf_counter() - start) * 1000
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    version = index.build_id if index.thumbnails is not None else None
    expires_s = thumbnail_expiry_s(settings.thumbnail_url_ttl_s)
    return json_response(
        SearchResponse(
            results=[
                search_hit(
                    hit, version and thumbnail_url(name, hit.id, version, api_key, expires_s)
                )
                for hit in hits
            ],
            index=name,
            k=query.k,
            took_ms=round(took_ms, 2),
        )
    )


def _form_filter(text: str | None) -> Any:
    """A multipart `filter` field: the filter object as JSON text."""
    if text is None or not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "validation_error", f"body.filter: not JSON: {exc}") from None


async def query_source(
    service: Service, index: ServedIndex, query: SearchQuery, settings: Settings
) -> QuerySource:
    """The query to encode (text, preprocessed image), or as a vector (given, or an indexed
    item's)."""
    if query.image is not None:
        (pixels,) = await prepare_images([query.image], service, settings)
        return QuerySource(image=pixels)
    if query.text is not None:
        return QuerySource(text=query.text)
    if query.embedding is not None:
        return QuerySource(vector=embedding_query(query.embedding, index.dim, "body.embedding"))
    assert query.id is not None
    try:
        return QuerySource(vector=index.vectors([query.id]))
    except KeyError:
        raise ApiError(
            404, "not_found", f"id {query.id} is not in this index ({index.count} items)"
        ) from None


def search_hit(hit: Hit, thumbnail: str | None = None) -> SearchHit:
    """A hit as the API shows it; `thumbnail`: its thumbnail's URL, if the index has them."""
    url = hit.url or hit.meta.get("url")  # an added image_url item has it beside its metadata
    return SearchHit(
        id=hit.id,
        key=hit.key,
        score=hit.score,
        caption=hit.caption,
        url=url if isinstance(url, str) else None,
        metadata=hit.meta,
        thumbnail_url=thumbnail,
    )
