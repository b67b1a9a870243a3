"""Stop a request's work when its client disconnects: a pure ASGI middleware.

A server tells an app that the client went away only through `receive()` (an `http.disconnect`
message), and only when the app calls it; a handler awaiting encoder work never does, so a
/classify whose client had left went on encoding its prompts for nobody (19 s). Once the
request's body has been read, `CancelOnDisconnect` waits on `receive()` itself and cancels the
handler when the disconnect arrives: the batcher skips jobs whose caller was cancelled, the
handler's remaining steps (a /classify's next prompt chunks) never run, and work already on a
thread (one chunk's tokenizing, one image's decoding) is the most that still runs.

Such a request is counted and logged with status 499 (nginx's "client closed request"), never
as a server error; nothing reaches the client, which is gone. A request still running when the
server stops and its graceful-shutdown time (`shutdown_timeout_s`) is over is cancelled too,
and answered 503 not_ready instead of the server's plain-text 500.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import error_response

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499
SHUTTING_DOWN = "the server is shutting down; retry shortly"


class CancelOnDisconnect:
    """Runs each HTTP request's handler as a task that a client disconnect cancels."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(receive, send)
        handler: asyncio.Future[None] = asyncio.ensure_future(
            self.app(scope, exchange.receive, exchange.send)
        )
        exchange.handler = handler
        try:
            await handler  # if this task is cancelled (shutdown), the handler is cancelled too
        except asyncio.CancelledError:
            if not await _answer_cancelled(scope, exchange):
                raise
        finally:
            exchange.stop_watching()


async def _answer_cancelled(scope: Scope, exchange: _Exchange) -> bool:
    """Answer a handler cancelled by its client leaving (499) or by the server stopping after
    its graceful-shutdown time (503); False for any other cancellation, which goes on."""
    current = asyncio.current_task()
    stopping = current is not None and current.cancelling() > 0
    if exchange.client_left:
        log.info("%s %s: the client left; its work stopped", scope["method"], scope["path"])
        await exchange.answer(scope, CLIENT_CLOSED_REQUEST, "client_closed", "client left")
    elif stopping:
        await exchange.answer(scope, 503, "not_ready", SHUTTING_DOWN)
    else:
        return False
    if stopping and current is not None:
        current.uncancel()  # answered: this request's task ends normally
    return True


class _Exchange:
    """One request's receive and send, watched for the client's disconnect."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        self.handler: asyncio.Future[None] | None = None
        self.client_left = False
        self._watcher: asyncio.Task[Message] | None = None
        self._started = self._finished = False

    async def receive(self) -> Message:
        if self._watcher is not None:  # the body is read: the watcher owns the server's receive
            return await asyncio.shield(self._watcher)  # the disconnect, when it comes
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self._watcher = asyncio.create_task(self._watch())
        return message

    async def _watch(self) -> Message:
        # After the body the server's receive returns only once the client has gone or the
        # answer is complete (uvicorn says "disconnect" for both): the latter is no reason.
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self._finished:
            self.client_left = True
            if self.handler is not None:
                self.handler.cancel()
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self._finished = True
        await self._send(message)

    async def answer(self, scope: Scope, status: int, type_: str, message: str) -> None:
        """The error envelope, unless an answer has started. A 499 goes no further than the
        middleware outside (metrics, access log): the server drops it, its client is gone."""
        if self._started:
            return
        response = error_response(status, type_, message, path=scope.get("path", ""))
        await response(scope, self._receive, self._send)

    def stop_watching(self) -> None:
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
