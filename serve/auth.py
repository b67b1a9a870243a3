"""Optional API key: with `DUET_API_KEY` set, requests must send it or get a 401 envelope.

The key goes in `X-API-Key: KEY` or `Authorization: Bearer KEY`. Public without it: the liveness
and readiness probes (/health, /ready: orchestrators call them without secrets, and they reveal
no data), the web page and its static files, and the API docs (/docs, /openapi.json) — none of
them reads the model, an index or the metrics. CORS preflights (OPTIONS) are answered before
this check by the CORS middleware.

An `<img>` tag cannot send a header, so a thumbnail may instead carry a signature in its URL:
`/thumbnails/INDEX/ID?v=BUILD&sig=HMAC` where HMAC is HMAC-SHA256 of (index, id, build) under the
API key. Such a URL is a capability for that one thumbnail of that one build of the index; the
search results hand them out (`thumbnail_url`), and the key itself never appears in a URL.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs, quote, urlencode

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.errors import error_response

PUBLIC_PATHS = frozenset(
    {"/health", "/ready", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
PUBLIC_PREFIXES = ("/static/", "/docs-assets/")
THUMBNAIL_PREFIX = "/thumbnails/"
SIGNATURE_HEX_CHARS = 32  # 128 bits of HMAC-SHA256


def thumbnail_signature(api_key: str, index: str, row_id: str, version: str) -> str:
    """What `sig` a thumbnail URL of (index, id, build version) must carry under `api_key`."""
    message = "\n".join(("thumbnail", index, row_id, version)).encode()
    return hmac.new(api_key.encode(), message, hashlib.sha256).hexdigest()[:SIGNATURE_HEX_CHARS]


def thumbnail_url(index: str, row_id: int, version: str, api_key: str | None) -> str:
    """The path of a thumbnail, relative to the service root: versioned, signed under a key."""
    query = {"v": version}
    if api_key is not None:
        query["sig"] = thumbnail_signature(api_key, index, str(row_id), version)
    return f"{THUMBNAIL_PREFIX}{quote(index, safe='')}/{row_id}?{urlencode(query)}"


def signed_thumbnail(scope: Scope, api_key: str) -> bool:
    """The request is for a thumbnail and carries a valid signature for it."""
    path: str = scope["path"]
    if not path.startswith(THUMBNAIL_PREFIX):
        return False
    index, _, row_id = path[len(THUMBNAIL_PREFIX) :].rpartition("/")
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    version, signature = query.get("v", [""])[0], query.get("sig", [""])[0]
    if not (index and row_id and version and signature):
        return False
    expected = thumbnail_signature(api_key, index, row_id, version)
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def presented_key(headers: dict[str, str]) -> str | None:
    """The key a request carries, from X-API-Key or an `Authorization: Bearer` header."""
    if key := headers.get("x-api-key"):
        return key
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


class ApiKeyMiddleware:
    """Refuses requests to non-public paths whose key is missing or wrong (constant-time check)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or is_public(scope["path"])
            or signed_thumbnail(scope, self.api_key)
        ):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = presented_key(headers)
        if key is None:
            message = "this service needs an API key: send X-API-Key or Authorization: Bearer"
        elif not hmac.compare_digest(key.encode(), self.expected):
            message = "the API key is not valid"
        else:
            await self.app(scope, receive, send)
            return
        response = error_response(401, "unauthorized", message)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
