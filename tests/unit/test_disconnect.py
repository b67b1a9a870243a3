"""CancelOnDisconnect: a handler stops when its client leaves, and only then."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from serve.disconnect import CancelOnDisconnect

SCOPE: dict[str, Any] = {"type": "http", "method": "POST", "path": "/classify", "headers": []}


class Client:
    """The server's side of one request, as uvicorn gives it: the body, then `http.disconnect`
    once the client has gone or the answer is complete."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.gone = asyncio.Event()
        self._body_read = False

    async def receive(self) -> Message:
        if not self._body_read:
            self._body_read = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.gone.set()  # uvicorn: receive() says "disconnect" once the answer is complete

    def status(self) -> int:
        return int(self.sent[0]["status"])


def slow_handler(progress: list[str]) -> Any:
    """Reads its body, then works in steps until cancelled; answers 200 after 50 steps."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        try:
            for step in range(50):
                progress.append(f"step {step}")
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            progress.append("cancelled")
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    return app


def test_the_handler_stops_when_its_client_leaves() -> None:
    progress: list[str] = []
    client = Client()

    async def scenario() -> None:
        serving = asyncio.ensure_future(
            CancelOnDisconnect(slow_handler(progress))(SCOPE, client.receive, client.send)
        )
        await asyncio.sleep(0.05)
        client.gone.set()  # the client closes its connection
        await asyncio.wait_for(serving, 5)

    asyncio.run(scenario())
    assert progress[-1] == "cancelled" and len(progress) < 50
    assert client.status() == 499  # for the metrics and the access log; the server drops it


def test_a_handler_whose_client_stays_is_not_cancelled_by_the_answer_completing() -> None:
    progress: list[str] = []
    client = Client()
    asyncio.run(CancelOnDisconnect(slow_handler(progress))(SCOPE, client.receive, client.send))
    assert "cancelled" not in progress and len(progress) == 50
    assert client.status() == 200 and client.sent[1]["body"] == b"done"


def test_a_handler_cancelled_by_the_server_stopping_is_answered_503() -> None:
    """uvicorn cancels the requests still running after its graceful-shutdown timeout."""
    progress: list[str] = []
    client = Client()

    async def scenario() -> None:
        serving = asyncio.ensure_future(
            CancelOnDisconnect(slow_handler(progress))(SCOPE, client.receive, client.send)
        )
        await asyncio.sleep(0.05)
        serving.cancel()
        await asyncio.wait_for(serving, 5)  # answered: it ends without raising

    asyncio.run(scenario())
    assert progress[-1] == "cancelled"
    assert client.status() == 503
    assert json.loads(client.sent[1]["body"])["type"] == "not_ready"


def test_receive_after_the_body_gets_the_disconnect_the_middleware_saw() -> None:
    """A handler may call receive() after its body (Starlette does, to hear a disconnect while
    it streams an answer): it gets the message the middleware's watcher took from the server."""
    heard: list[str] = []
    client = Client()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        heard.append((await receive())["type"])

    serving = CancelOnDisconnect(app)(SCOPE, client.receive, client.send)
    asyncio.run(asyncio.wait_for(serving, 5))
    assert heard == ["http.disconnect"] and client.status() == 200
