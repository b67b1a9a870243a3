"""Connection limits uvicorn lacks: deadlines for a request's headers and body, header limits.

uvicorn closes idle keep-alive connections, but a connection that has sent part of a request's
headers, or part of its body, stays open for as long as the client trickles bytes (slowloris):
a few hundred such connections hold every file descriptor and buffer. `guarded_protocol(limits)`
is uvicorn's httptools protocol with:

- a header deadline: a request's line and headers must be complete `header_timeout_s` after the
  connection opened or the request's first byte arrived, else 408 and the connection is closed;
- a body deadline: its body must be complete `body_timeout_s` after its headers, else 408 (or,
  if an answer has started, just the close) — the handler waiting for it sees a disconnect;
- a send deadline: an answer the client does not take up (the transport's write buffer stays
  over its high-water mark, 64 KiB, because the peer does not read) is given `send_timeout_s`
  to drain, else the connection is aborted and the buffered answer freed — a client that sends
  small requests for large answers and never reads them cannot hold the service's memory;
- header limits: more than `max_header_count` headers, or a request line plus headers over
  `max_header_bytes`, get 431 and the connection is closed;
- malformed HTTP gets the service's JSON error envelope (400) instead of uvicorn's plain text
  (OpenAI's envelope when the request line named a path under /v1, as `serve.errors` says).

`python -m serve` passes `guarded_protocol(...)` to uvicorn; under the `uvicorn` command (the
Docker image) use `--http serve.http:GuardedHttpToolsProtocol` (`UVICORN_HTTP=...`), which reads
its limits from the DUET_* settings.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serve.errors import error_body
from serve.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    max_header_count: int
    send_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            send_timeout_s=settings.send_timeout_s,
        )


class _HeadersTooLarge(Exception):
    """Raised from a parser callback to stop parsing; answered with 431."""


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol class with `limits` (pass it as `uvicorn.run(http=...)`)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """See the module doc; `limits` is set by `guarded_protocol`, or read from the settings."""

    limits: ClassVar[ConnectionLimits | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if type(self).limits is None:  # the uvicorn command: from DUET_* variables, once
            type(self).limits = ConnectionLimits.from_settings(Settings())  # type: ignore[call-arg]
        self._limits: ConnectionLimits = type(self).limits  # type: ignore[assignment]
        self._deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._header_count = 0
        self._refusal: tuple[int, str, str] | None = None

    # --- deadlines ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._limits.header_timeout_s, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_send()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = self._header_count = 0
        if self._deadline is None:  # a later request on a kept-alive connection
            self._arm(self._limits.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        self._disarm()
        self._arm(self._limits.body_timeout_s, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, timeout_s: float, what: str) -> None:
        self._deadline = self.loop.call_later(timeout_s, self._expired, timeout_s, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, timeout_s: float, what: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.info(
            "closing a connection from %s: its %s took over %s s", self.client, what, timeout_s
        )
        if not self._answering(what):  # else too late for an answer: just the close
            message = f"the request's {what} did not arrive within {timeout_s:g} s"
            self._write_error(408, "timeout", message)
        self.transport.close()

    def _answering(self, what: str) -> bool:
        """An answer is being written on this connection: to the request whose body is late,
        or to an earlier one (the headers of a pipelined request are late)."""
        if self.cycle is None:
            return False
        if what == "body":
            return self.cycle.response_started
        return not self.cycle.response_complete

    # --- send deadline: the peer must read what it asked for ---

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            timeout_s = self._limits.send_timeout_s
            self._send_deadline = self.loop.call_later(timeout_s, self._send_expired, timeout_s)

    def resume_writing(self) -> None:
        self._disarm_send()
        super().resume_writing()

    def _disarm_send(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _send_expired(self, timeout_s: float) -> None:
        self._send_deadline = None
        log.info(
            "aborting a connection from %s: it did not read its answer for %s s",
            self.client,
            timeout_s,
        )
        self.transport.abort()  # close() would wait to flush what the peer does not read

    # --- header limits and malformed requests ---

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self._limits.max_header_count:
            self._refuse(f"more than {self._limits.max_header_count} headers")
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self._limits.max_header_bytes:
            self._refuse(
                f"the request line and headers are over {self._limits.max_header_bytes} bytes"
            )

    def _refuse(self, message: str) -> None:
        self._refusal = (431, "headers_too_large", message)
        raise _HeadersTooLarge(message)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error: here, the envelope (431 for our header limits)."""
        self._disarm()
        status, type_, message = self._refusal or (400, "bad_request", "malformed HTTP request")
        self._write_error(status, type_, message)
        self.transport.close()

    def _write_error(self, status: int, type_: str, message: str) -> None:
        # the request target so far, if any: under /v1 the envelope is OpenAI's
        path = getattr(self, "url", b"").partition(b"?")[0].decode("latin-1")
        body = json.dumps(error_body(path, status, type_, message)).encode()
        head = [STATUS_LINE[status]]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
