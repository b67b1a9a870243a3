"""Optional API key: with `DUET_API_KEY` set, requests must send it or get a 401 envelope.

The key goes in `X-API-Key: KEY` or `Authorization: Bearer KEY` and is compared, in constant
time, as bytes with the key's UTF-8 bytes: headers arrive as bytes, so a non-ASCII key is sent
as its UTF-8 bytes, raw in the header (curl from a UTF-8 terminal, the web page, or httpx given
`bytes` do that); its latin-1 bytes are another key. Public without it: the liveness and
readiness probes (/health, /ready: orchestrators call them without secrets, and they reveal no
data), the web page and its static files, and the API docs (/docs, /openapi.json) — none of
them reads the model, an index or the metrics. CORS preflights (OPTIONS) are answered before
this check by the CORS middleware.

Thumbnails are checked by their route, not here (serve/routes/thumbnails.py): an `<img>` tag
cannot send a header, so a thumbnail URL may carry a signature instead,
`/thumbnails/INDEX/ID?v=BUILD&exp=UNIX_S&sig=HMAC`, with HMAC the first 32 hex digits of
HMAC-SHA256 under the key's UTF-8 bytes of the JSON array `["thumbnail", INDEX, ID, BUILD, EXP]`.
Such a URL is a capability for that one thumbnail of that one build of the index until `exp`;
the search results hand them out (`thumbnail_url`), and the key itself never appears in a URL.
The route reads the one query it serves from and checks key, signature, expiry and build
together, so no two readings of a query can disagree.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from urllib.parse import quote, urlencode

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.errors import ApiError, error_response

PUBLIC_PATHS = frozenset(
    {"/health", "/ready", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
PUBLIC_PREFIXES = ("/static/", "/docs-assets/")
THUMBNAIL_PREFIX = "/thumbnails/"
SIGNATURE_HEX_CHARS = 32  # 128 bits of HMAC-SHA256
MISSING_KEY = "this service needs an API key: send X-API-Key or Authorization: Bearer"
WRONG_KEY = "the API key is not valid"


def key_bytes(api_key: str) -> bytes:
    """The bytes a request must send and the signatures are made with: the key's UTF-8."""
    return api_key.encode("utf-8")


def thumbnail_signature(key: bytes, index: str, row_id: str, version: str, expires_s: int) -> str:
    """What `sig` a thumbnail URL of (index, id, build, expiry) must carry under `key`.

    A JSON array, not joined strings: no two tuples give the same message."""
    message = json.dumps(["thumbnail", index, row_id, version, expires_s]).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:SIGNATURE_HEX_CHARS]


def thumbnail_expiry_s(ttl_s: int, now_s: float | None = None) -> int:
    """When a URL handed out now expires: at least `ttl_s` from now, at most 2 × `ttl_s`.

    Rounded up to a multiple of `ttl_s` so that every search within one such window hands out
    the same URL for a thumbnail, and a browser's cache serves the repeats."""
    now_s = time.time() if now_s is None else now_s
    return (math.floor(now_s / ttl_s) + 2) * ttl_s


def thumbnail_url(
    index: str, row_id: int, version: str, api_key: str | None, expires_s: int
) -> str:
    """The path of a thumbnail, relative to the service root: versioned; under a key, signed
    until `expires_s` (Unix seconds)."""
    query: dict[str, str | int] = {"v": version}
    if api_key is not None:
        query["exp"] = expires_s
        query["sig"] = thumbnail_signature(
            key_bytes(api_key), index, str(row_id), version, expires_s
        )
    return f"{THUMBNAIL_PREFIX}{quote(index, safe='')}/{row_id}?{urlencode(query)}"


def signature_problem(
    key: bytes, index: str, row_id: str, version: str, expires_s: int, signature: str
) -> str | None:
    """Why a signed thumbnail URL does not open its thumbnail now; None when it does."""
    expected = thumbnail_signature(key, index, row_id, version, expires_s)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        return "the thumbnail URL's signature is not valid"
    if expires_s <= time.time():
        return "the thumbnail URL has expired: search again for a fresh one"
    return None


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries, as sent, from X-API-Key or an `Authorization: Bearer` header."""
    named = dict(headers)  # ASGI header names are lower-case
    if key := named.get(b"x-api-key", b"").strip():
        return key
    scheme, _, credentials = named.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer" and credentials.strip():
        return credentials.strip()
    return None


def key_problem(headers: list[tuple[bytes, bytes]], expected: bytes) -> str | None:
    """Why a request's headers do not carry the key `expected` (constant time); None if they do."""
    key = presented_key(headers)
    if key is None:
        return MISSING_KEY
    if not hmac.compare_digest(key, expected):
        return WRONG_KEY
    return None


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


class ApiKeyMiddleware:
    """Refuses requests to non-public paths whose key is missing or wrong (constant-time check).

    `/thumbnails/` passes through: its route checks the key or the URL's signature itself."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = key_bytes(api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or is_public(path) or path.startswith(THUMBNAIL_PREFIX):
            await self.app(scope, receive, send)
            return
        message = key_problem(scope["headers"], self.expected)
        if message is None:
            await self.app(scope, receive, send)
            return
        response = error_response(401, "unauthorized", message, path=path)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
