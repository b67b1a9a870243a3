"""POST /search: top-k index entries for a text (JSON body) or an uploaded image (multipart)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import pydantic
from fastapi import APIRouter, Depends, Request

from serve.errors import ApiError, error_responses
from serve.routes import (
    ServiceDep,
    SettingsDep,
    as_request_error,
    decode_image,
    media_type,
    read_body,
    read_form,
    read_upload,
    validate,
)
from serve.schemas import ImageSearchForm, SearchHit, SearchRequest, SearchResponse

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
                },
            }
        },
    },
}


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A parsed search: exactly one of `text` and `image` (undecoded bytes) is set."""

    k: int
    text: str | None = None
    image: bytes | None = None


async def search_query(request: Request, settings: SettingsDep) -> SearchQuery:
    """Read the body by its content type; async because it only awaits the bytes."""
    kind = media_type(request)
    if kind == "application/json":
        body = await read_body(request, settings.max_request_bytes)
        try:
            parsed = SearchRequest.model_validate_json(body, context={"settings": settings})
        except pydantic.ValidationError as exc:
            raise as_request_error(exc) from None
        return SearchQuery(k=parsed.k or settings.default_k, text=parsed.text)
    if kind == "multipart/form-data":
        form = await read_form(request, settings)
        try:
            image = await read_upload(form, "image", settings)
            fields = validate(ImageSearchForm, {"k": form.get("k")}, settings)
        finally:
            await form.close()
        return SearchQuery(k=fields.k or settings.default_k, image=image)
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {kind or '(none)'!r} is not supported: send application/json with "
        '{"text": ...} or multipart/form-data with an "image" file',
    )


SearchQueryDep = Annotated[SearchQuery, Depends(search_query)]


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Search the index by text or by image",
    responses=error_responses(400, 413, 415, 422, 503),
    openapi_extra={"requestBody": REQUEST_BODY_DOC},
)
def search(
    service: ServiceDep,
    query: SearchQueryDep,
    settings: SettingsDep,
) -> SearchResponse:
    """JSON `{"text": "red circle", "k": 5}`, or multipart with an `image` file and optional `k`."""
    start = time.perf_counter()
    if query.image is not None:
        embedding = service.encoder.encode_images([decode_image(query.image, settings)])
    else:
        embedding = service.encoder.encode_texts([query.text or ""])
    (hits,) = service.index.search(embedding, query.k)
    results = [
        SearchHit(id=h.id, key=h.key, score=h.score, caption=h.caption, metadata=h.meta)
        for h in hits
    ]
    took_ms = (time.perf_counter() - start) * 1000
    return SearchResponse(results=results, k=query.k, took_ms=round(took_ms, 2))
