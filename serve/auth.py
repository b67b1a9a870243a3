"""Optional API key: with `DUET_API_KEY` set, requests must send it or get a 401 envelope.

The key goes in `X-API-Key: KEY` or `Authorization: Bearer KEY`. Public without it: the liveness
and readiness probes (/health, /ready: orchestrators call them without secrets, and they reveal
no data), the web page and its static files, and the API docs (/docs, /openapi.json) — none of
them reads the model, an index or the metrics. CORS preflights (OPTIONS) are answered before
this check by the CORS middleware.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.errors import error_response

PUBLIC_PATHS = frozenset(
    {"/health", "/ready", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
PUBLIC_PREFIXES = ("/static/", "/docs-assets/")


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
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
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
