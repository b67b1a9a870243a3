"""clip-retrieval's back-end API, so its `ClipClient` and its web front work against this service.

    POST /knn-service   {text | image (base64) | image_url | embedding_input, modality,
                         num_images, num_result_ids, indice_name, deduplicate, ...}
                        -> [{id, similarity, caption, url, key, <metadata>...}, ...]
    GET  /indices-list  -> ["default", ...]
    POST /metadata      {ids, indice_name} -> [{id, metadata: {caption, url, ...}}, ...]

Like clip-retrieval's back end, bodies are read as JSON whatever the Content-Type (its client
sends none), and /knn-service returns `num_result_ids` results of which the first `num_images`
carry metadata (its front fetches the rest from /metadata as the user scrolls). Options this
service does not have (safety and violence filters, multilingual CLIP, aesthetic re-weighting,
a separate text index for modality "text") are accepted and ignored; the response names the
ones that were asked for in `X-Duet-Ignored`. `num_result_ids` above DUET_MAX_K is lowered to it
and reported in `X-Duet-Clamped`. One field is this service's own: `filter` (the metadata filter
of POST /search); clip-retrieval's clients never send it, so they see no change. Errors use the
service's own JSON envelope.

What the front shows (read from its built code, `renderImage`): `url` if the result has the key
at all, else `data:image/png;base64, ` + `image`; a result whose picture fails to load is hidden.
So a result whose row has no web URL carries no `url` key (a null would be shown as the address
"null") and, when the index has thumbnails, the thumbnail inline as base64 in `image` — as
clip-retrieval's own back end does with images it reads from disk. Browsers sniff the image
format, so WebP bytes display behind its `image/png` data URI.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from serve import retrieval
from serve.body import decode_base64_off_loop, read_json
from serve.errors import ApiError, error_responses
from serve.images import download_image, prepare_images
from serve.indexing.index import Hit
from serve.indexing.store import ServedIndex
from serve.schemas import KnnRequest, MetadataRequest
from serve.service import (
    QuerySource,
    Service,
    ServiceDep,
    SettingsDep,
    embedding_query,
    filter_query,
    search_with,
)
from serve.settings import Settings

router = APIRouter(tags=["clip-retrieval"])

IGNORED_HEADER = "X-Duet-Ignored"
CLAMPED_HEADER = "X-Duet-Clamped"


def ignored_options(query: KnnRequest) -> list[str]:
    """The unsupported options the request actually asked for (set, and not off)."""
    asked = [
        name
        for name in ("use_safety_model", "use_violence_detector", "use_mclip")
        if getattr(query, name)
    ]
    asked += [
        name
        for name in ("aesthetic_score", "aesthetic_weight")
        if getattr(query, name) not in (None, "")
    ]
    if query.modality == "text":
        asked.append("modality")
    return asked


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that reads its JSON itself (`read_json`)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


@router.post(
    "/knn-service",
    summary="clip-retrieval: nearest neighbours of a text, image, image URL or embedding",
    responses=error_responses(400, 401, 404, 413, 422, 429, 503),
    openapi_extra=_json_body(KnnRequest),
)
async def knn_service(request: Request, service: ServiceDep, settings: SettingsDep) -> JSONResponse:
    query = await read_json(request, KnnRequest, settings)  # any Content-Type, or none
    if query.modality not in (None, "image", "text"):
        raise ApiError(422, "validation_error", 'body.modality: must be "image" or "text"')
    wanted = query.num_result_ids or query.num_images or settings.default_k
    num_result_ids = min(wanted, settings.max_k)
    num_images = min(query.num_images if query.num_images is not None else wanted, num_result_ids)
    name = service.indices.resolve(query.indice_name)
    dedup = retrieval.CLIP_RETRIEVAL_DEDUP_THRESHOLD if query.deduplicate else None
    with service.indices.lease(name) as index:
        where = filter_query(index, query.filter, settings, "body.filter")

        def find(vector: np.ndarray) -> list[Hit]:
            return retrieval.search(
                index,
                vector,
                num_result_ids,
                dedup_threshold=dedup,
                overfetch=settings.dedup_overfetch,
                where=where,
            )

        source = await _query_source(service, index, query, settings)
        hits = await search_with(service, source, find, in_threadpool=index.searches_in_threadpool)
        shown = hits[:num_images]
        images = await run_in_threadpool(_thumbnails, index, [hit.id for hit in shown])
    results: list[dict[str, Any]] = []
    for rank, hit in enumerate(hits):
        entry: dict[str, Any] = {}
        if rank < num_images:
            entry.update(_flat_metadata(hit.key, hit.caption, hit.meta, images.get(hit.id)))
        entry.update(id=hit.id, similarity=hit.score)
        results.append(entry)
    headers = {}
    if ignored := ignored_options(query):
        headers[IGNORED_HEADER] = ",".join(ignored)
    if wanted > num_result_ids:
        headers[CLAMPED_HEADER] = f"num_result_ids={num_result_ids}"
    return JSONResponse(results, headers=headers)


async def _query_source(
    service: Service, index: ServedIndex, query: KnnRequest, settings: Settings
) -> QuerySource:
    if query.text:
        return QuerySource(text=query.text)
    if query.embedding_input is not None:
        vector = embedding_query(query.embedding_input, index.dim, "body.embedding_input")
        return QuerySource(vector=vector)
    if query.image:
        data = await decode_base64_off_loop(query.image, "body.image", settings)
    else:
        assert query.image_url
        data = await download_image(query.image_url, settings)
    (pixels,) = await prepare_images([data], service, settings)
    return QuerySource(image=pixels)


def _flat_metadata(
    key: str, caption: str, meta: dict[str, Any], image: str | None = None
) -> dict[str, Any]:
    """clip-retrieval's result shape: metadata columns at the top level, `url` only when the row
    has one, `image` (base64 of the thumbnail) when given."""
    entry = {**meta, "caption": caption, "key": key}
    url = entry.pop("url", None)
    if isinstance(url, str) and url:
        entry["url"] = url
    if image is not None:
        entry["image"] = image
    return entry


def _thumbnails(index: ServedIndex, ids: list[int]) -> dict[int, str]:
    """Base64 thumbnails of `ids` that have one; none for an index built without them."""
    if index.thumbnails is None:
        return {}
    found = {row_id: index.thumbnails.get(row_id) for row_id in ids}
    return {i: base64.b64encode(data).decode() for i, data in found.items() if data is not None}


@router.get(
    "/indices-list",
    response_model=list[str],
    summary="clip-retrieval: the index names",
    responses=error_responses(401, 503),
)
async def indices_list(service: ServiceDep) -> list[str]:
    return service.indices.names


@router.post(
    "/metadata",
    summary="clip-retrieval: metadata of result ids",
    responses=error_responses(401, 404, 413, 422, 503),
    openapi_extra=_json_body(MetadataRequest),
)
async def metadata(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    """Ids that are not in the index are left out of the answer."""
    query = await read_json(request, MetadataRequest, settings)
    with service.indices.lease(query.indice_name) as index:
        # Off the event loop: reading rows and thumbnails, and serialising up to
        # max_response_bytes of JSON, would otherwise stall every other request meanwhile; and
        # one answer at a time (`answer_builds`), so many at once cannot crowd out the rest.
        async with service.answer_builds:
            body = await run_in_threadpool(
                _metadata_answer, index, query.ids, settings.max_response_bytes
            )
    return Response(body, media_type="application/json")


def _metadata_answer(index: ServedIndex, ids: list[int], max_bytes: int) -> bytes:
    """The answer's JSON, a row at a time, charged as it grows: 413 once over `max_bytes`."""
    rows = index.rows(ids)
    parts: list[bytes] = []
    size = 2  # the brackets
    for i in ids:
        if i not in rows:
            continue
        image = _thumbnails(index, [i]).get(i)
        entry = {
            "id": i,
            "metadata": _flat_metadata(rows[i].key, rows[i].caption, rows[i].meta, image),
        }
        part = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode()
        size += len(part) + 1
        if size > max_bytes:
            raise ApiError(
                413,
                "too_large",
                f"the answer for {len(ids)} ids is over {max_bytes} bytes (max_response_bytes); "
                "ask for fewer ids at a time",
            )
        parts.append(part)
    return b"[" + b",".join(parts) + b"]"
