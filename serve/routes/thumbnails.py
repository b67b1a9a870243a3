"""GET /thumbnails/{index}/{id}: the thumbnail stored with an indexed image, its access and
build checked in one place.

The answer is the bytes as stored at build time (WebP or JPEG) with a strong ETag made of the
index's build id and the row id.

The query holds only `v` (the build), `exp` and `sig` (a signed URL, serve/auth.py), each at
most once; anything else, a repeat included, is 422: a URL read two ways (the first `v` by one
check, the last by another) could open what it was not signed for. The id is written as
`thumbnail_url` writes it, decimal digits without sign, leading zero or spaces (`01`, `+1`,
`1.0`, ` 1`: 422); an id with no thumbnail is 404. A `v` of an earlier build is 404: that
build's thumbnails are gone.

With an API key, the request carries the key in a header or a URL signed over (index, id, v,
exp) with `exp` still ahead, else 401. The key middleware lets /thumbnails/ through, and this
route checks key, signature, expiry and build on its one reading of the query.

Caching: a URL with `v` names content that never changes, so it is cached as immutable for a
year, or only until `exp` when the URL has one (a signed URL must not outlive its expiry in a
cache); without `v` it is revalidated with the ETag each time. Under a key the cache is private
to the browser. `If-None-Match` as RFC 9110 says: `*` matches the thumbnail if it exists, else
a list of entity tags compared weakly (`W/"x"` matches `"x"`); a 304 carries ETag and
Cache-Control.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi import Path as PathParam

from serve.auth import key_bytes, key_problem, signature_problem, unauthorized
from serve.errors import ApiError, error_responses
from serve.indexing.thumbnails import MEDIA_TYPES
from serve.service import ServiceDep, SettingsDep

router = APIRouter(tags=["search"])

IMMUTABLE_S = 365 * 24 * 3600
ROW_ID_PATTERN = r"^(0|[1-9][0-9]{0,18})$"  # canonical decimal, below 10^19
EXPIRY_PATTERN = re.compile(r"0|[1-9][0-9]{0,11}")
QUERY_FIELDS = ("v", "exp", "sig")
MAX_QUERY_VALUE_CHARS = 64
ENTITY_TAG = re.compile(r'(?:W/)?"([^"]*)"')  # RFC 9110 entity-tag; W/ dropped: weak comparison

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The thumbnail.",
        "content": {media: {"schema": {"type": "string", "format": "binary"}}
                    for media in MEDIA_TYPES.values()},
    },
    304: {"description": "Not modified: the client's copy (If-None-Match) is current."},
    **error_responses(401, 404, 422, 503),
}  # fmt: skip
QUERY_DOCS = [  # read by thumbnail_query, not by FastAPI: documented here
    {"name": "v", "in": "query", "required": False,
     "schema": {"type": "string", "maxLength": MAX_QUERY_VALUE_CHARS},
     "description": "The index build the URL names; another build's is 404."},
    {"name": "exp", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 0, "maximum": 10**12 - 1},
     "description": "When a signed URL expires, Unix seconds."},
    {"name": "sig", "in": "query", "required": False,
     "schema": {"type": "string", "maxLength": MAX_QUERY_VALUE_CHARS},
     "description": "The URL's signature (with an API key; see `thumbnail_url`)."},
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class ThumbnailQuery:
    """The one reading of a thumbnail URL's query."""

    version: str | None
    expires_s: int | None
    signature: str | None


def thumbnail_query(request: Request) -> ThumbnailQuery:
    """`v`, `exp` and `sig`, each at most once, and nothing else (422)."""
    values: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in QUERY_FIELDS:
            raise ApiError(
                422, "validation_error", f"query.{name[:40]}: this route takes only v, exp, sig"
            )
        if name in values:
            raise ApiError(422, "validation_error", f"query.{name}: given more than once")
        if len(value) > MAX_QUERY_VALUE_CHARS:
            raise ApiError(
                422, "validation_error", f"query.{name}: at most {MAX_QUERY_VALUE_CHARS} characters"
            )
        values[name] = value
    expires = values.get("exp")
    if expires is not None and not EXPIRY_PATTERN.fullmatch(expires):
        raise ApiError(422, "validation_error", "query.exp: Unix seconds, in decimal digits")
    return ThumbnailQuery(
        values.get("v"), None if expires is None else int(expires), values.get("sig")
    )


def authorized_query(request: Request, settings: SettingsDep) -> ThumbnailQuery:
    """The query, once the request may see this thumbnail: without a key configured, anyone;
    with one, the key in a header or the URL's valid, unexpired signature (else 401).

    A dependency, so it runs before the path is validated: without access, every answer is 401."""
    query = thumbnail_query(request)
    if settings.api_key is None:
        return query
    key = key_bytes(settings.api_key.get_secret_value())
    problem = key_problem(request.scope["headers"], key)
    if problem is None:
        return query
    if query.signature is None:
        raise unauthorized(problem)
    if query.version is None or query.expires_s is None:
        raise unauthorized("a signed thumbnail URL carries v, exp and sig: search again")
    path = request.path_params
    problem = signature_problem(
        key, path["index"], path["id"], query.version, query.expires_s, query.signature
    )
    if problem is not None:
        raise unauthorized(problem)
    return query


def cache_control(query: ThumbnailQuery, private: bool) -> str:
    """Immutable for a `v` URL, but never cached past the URL's `exp`; else revalidate."""
    who = "private" if private else "public"
    if query.version is None:
        return f"{who}, no-cache"
    max_age_s = IMMUTABLE_S
    if query.expires_s is not None:
        max_age_s = max(0, min(IMMUTABLE_S, math.floor(query.expires_s - time.time())))
    return f"{who}, max-age={max_age_s}, immutable"


def etag_matches(if_none_match: str, opaque_tag: str) -> bool:
    """RFC 9110 13.1.2 for an existing thumbnail: `*`, or any listed tag equal by weak
    comparison (opaque tags equal, `W/` ignored)."""
    if if_none_match.strip() == "*":
        return True
    return any(tag.group(1) == opaque_tag for tag in ENTITY_TAG.finditer(if_none_match))


@router.get(
    "/thumbnails/{index}/{id}",
    response_class=Response,
    summary="The thumbnail of an indexed image (WebP or JPEG), as linked by `thumbnail_url`",
    responses=RESPONSES,
    openapi_extra={"parameters": QUERY_DOCS},
)
def thumbnail(
    index: Annotated[str, PathParam(max_length=200, description="Index name.")],
    id: Annotated[
        str,
        PathParam(pattern=ROW_ID_PATTERN, description="Row id, in decimal (no sign or 0 prefix)."),
    ],
    service: ServiceDep,
    settings: SettingsDep,
    query: Annotated[ThumbnailQuery, Depends(authorized_query)],
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
        if query.version is not None and query.version != loaded.build_id:
            raise ApiError(
                404,
                "not_found",
                f"v={query.version!r} is not the current build of index {index!r}: search again",
            )
        opaque_tag = f"{loaded.build_id}-{id}"
        data = loaded.thumbnails.get(int(id))
        media_type = loaded.thumbnails.media_type
    if data is None:
        raise ApiError(404, "not_found", f"no thumbnail with id {id} in index {index!r}")
    headers = {
        "ETag": f'"{opaque_tag}"',
        "Cache-Control": cache_control(query, private=settings.api_key is not None),
    }
    if if_none_match is not None and etag_matches(if_none_match, opaque_tag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)
