"""HEAD wherever GET is: one ASGI middleware for the whole app, not a HEAD route per GET route.

A HEAD request runs as the GET of the same URL and is answered with that GET's status and
headers (Content-Length included) and no body (RFC 9110, 9.3.2): what load balancers, uptime
monitors, link checkers and caches expect of /health, /thumbnails/... or /v1/models alike. A
route without GET answers HEAD as it answers GET: 405 with its `Allow` header.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """Runs HEAD requests as GET and drops the body of the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # a streamed body's chunks: none is sent
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)
