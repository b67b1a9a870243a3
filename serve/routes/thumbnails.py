"""GET /thumbnails/{index}/{id}: the thumbnail stored with an indexed image, cacheable for good.

The answer is the bytes as stored at build time (WebP or JPEG) with a strong ETag made of the
index's build id and the row id. A URL that names the build (`?v=BUILD`, as `thumbnail_url` in
search results does) can never change content, so it is cached for a year as immutable; one
without `v` is revalidated with the ETag each time. A `v` of an earlier build is 404: that build's
thumbnails are gone. With an API key set, the key or the URL's signature (`sig`) is required
(serve/auth.py); the cache is then private to the browser.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi import Path as PathParam

from serve.errors import ApiError, error_responses
from serve.service import ServiceDep, SettingsDep
from serve.thumbnails import MEDIA_TYPES

router = APIRouter(tags=["search"])

MAX_ROW_ID = 2**63 - 1
IMMUTABLE_S = 365 * 24 * 3600

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The thumbnail.",
        "content": {media: {"schema": {"type": "string", "format": "binary"}}
                    for media in MEDIA_TYPES.values()},
    },
    304: {"description": "Not modified: the client's copy (If-None-Match) is current."},
    **error_responses(401, 404, 422, 503),
}  # fmt: skip


@router.get(
    "/thumbnails/{index}/{id}",
    response_class=Response,
    summary="The thumbnail of an indexed image (WebP or JPEG), as linked by `thumbnail_url`",
    responses=RESPONSES,
)
def thumbnail(
    index: Annotated[str, PathParam(max_length=200, description="Index name.")],
    id: Annotated[int, PathParam(ge=0, le=MAX_ROW_ID, description="Row id in the index.")],
    service: ServiceDep,
    settings: SettingsDep,
    v: Annotated[str | None, Query(max_length=64, description="The index build.")] = None,
    sig: Annotated[str | None, Query(max_length=64, description="URL signature.")] = None,
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
) -> Response:
    """Plain `def`: the read (one `os.pread`) runs in the threadpool."""
    with service.indices.lease(index) as loaded:
        if loaded.thumbnails is None:
            raise ApiError(
                404,
                "not_found",
                f"index {index!r} has no thumbnails: build it with "
                "`python -m serve.build_index --thumbnails webp`",
            )
        if v is not None and v != loaded.build_id:
            raise ApiError(
                404,
                "not_found",
                f"v={v!r} is not the current build of index {index!r}: search again",
            )
        etag = f'"{loaded.build_id}-{id}"'
        private = settings.api_key is not None
        cache = f"max-age={IMMUTABLE_S}, immutable" if v is not None else "no-cache"
        headers = {"ETag": etag, "Cache-Control": f"{'private' if private else 'public'}, {cache}"}
        data = loaded.thumbnails.get(id)
        media_type = loaded.thumbnails.media_type
    if data is None:
        raise ApiError(404, "not_found", f"no thumbnail with id {id} in index {index!r}")
    if if_none_match is not None and etag in (t.strip() for t in if_none_match.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)
