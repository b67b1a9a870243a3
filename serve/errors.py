"""The error envelopes and the one place errors map to statuses.

Every route answers errors in Duet's envelope `{"error": "<message>", "type": "<type>"}`, except
the OpenAI-compatible routes under /v1, which answer in OpenAI's
`{"error": {"message", "type", "param", "code"}}` (its clients, and LangChain and LlamaIndex
through them, show only `error.message`): `type` is `invalid_request_error` (4xx) or
`server_error` (5xx) as OpenAI's own API says, `code` is Duet's type below, `param` the request
field at fault where one is (`input`, `model`, `dimensions`), else null. `error_body` chooses
by the request's path, for the handlers here, the middlewares and the HTTP server's limits alike.

request validation (pydantic)      422 validation_error
HTTPException (routing, parsing)   its status; type from the status (404 not_found, ...)
ApiError (our own)                 its status and type: 400 bad_request, 401 unauthorized,
                                   404 not_found, 413 too_large / image_too_large,
                                   415 unsupported_media_type / not_an_image, 503 not_ready
HTTP server limits (serve.http)    408 timeout, 431 headers_too_large, 400 bad_request
UnknownIndexError                  404 not_found
IndexReadOnlyError                 409 read_only (another process writes the index, or it is
                                   served read-only)
JournalWriteError                  507 insufficient_storage (an update could not be made
                                   durable; nothing changed)
Overloaded (encode queue full)     429 overloaded, with Retry-After
VectorStoreUnavailable             503 unavailable, with Retry-After (Qdrant could not be
                                   reached or did not answer within DUET_QDRANT_TIMEOUT_S)
anything else                      500 internal_error, generic message, logged with traceback
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.batching import Overloaded
from serve.indexing.journal import IndexReadOnlyError, JournalWriteError
from serve.indexing.store import VectorStoreUnavailable
from serve.registry import UnknownIndexError
from serve.schemas import ErrorResponse

log = logging.getLogger(__name__)

TYPE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "overloaded",
    431: "headers_too_large",
    500: "internal_error",
    503: "not_ready",
    507: "insufficient_storage",
}


OPENAI_PREFIX = "/v1"


class ApiError(Exception):
    """An error of ours with its HTTP status, envelope type and message for the client;
    `param`: the request field at fault, for OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers or {}
        self.param = param


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_body(
    path: str, status: int, type: str, message: str, param: str | None = None
) -> dict[str, Any]:
    """Duet's envelope, or OpenAI's for a path under /v1."""
    if not is_openai_path(path):
        return {"error": message, "type": type}
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": type}}


def error_response(
    status: int, type: str, message: str, *, path: str, param: str | None = None
) -> JSONResponse:
    """The error answer to a request for `path` (the envelope depends on it)."""
    return JSONResponse(error_body(path, status, type, message, param), status_code=status)


def error_responses(
    *statuses: int, model: type[BaseModel] = ErrorResponse
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the envelope (`model`) for these statuses."""
    return {
        status: {"model": model, "description": TYPE_BY_STATUS.get(status, "error")}
        for status in statuses
    }


def validation_param(errors: Sequence[Any]) -> str | None:
    """The body field of the first error (`input` for body.input.3), for OpenAI's `param`."""
    loc = tuple(errors[0].get("loc", ())) if errors else ()
    return str(loc[1]) if len(loc) > 1 and loc[0] == "body" else None


def validation_message(errors: Sequence[Any]) -> str:
    """pydantic errors -> "body.k: Input should be greater than or equal to 1; ..."."""
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    response = error_response(
        exc.status, exc.type, exc.message, path=request.url.path, param=exc.param
    )
    response.headers.update(exc.headers)
    return response


async def _on_unknown_index(request: Request, exc: Exception) -> JSONResponse:
    return error_response(404, "not_found", str(exc), path=request.url.path)


async def _on_read_only(request: Request, exc: Exception) -> JSONResponse:
    return error_response(409, "read_only", str(exc), path=request.url.path)


async def _on_journal_write(request: Request, exc: Exception) -> JSONResponse:
    log.error("an index update was refused: %s", exc)
    return error_response(507, "insufficient_storage", str(exc), path=request.url.path)


async def _on_overloaded(request: Request, exc: Exception) -> JSONResponse:
    """Refuse now rather than queue: the client retries after Retry-After seconds."""
    request.app.state.metrics.rejected.inc()
    response = error_response(429, "overloaded", str(exc), path=request.url.path)
    response.headers["Retry-After"] = str(request.app.state.settings.retry_after_s)
    return response


async def _on_store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The vector store is down or slow: nothing was done, the client may retry."""
    log.warning("vector store unavailable on %s: %s", request.url.path, exc)
    response = error_response(503, "unavailable", str(exc), path=request.url.path)
    response.headers["Retry-After"] = str(request.app.state.settings.retry_after_s)
    return response


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    return error_response(
        422,
        "validation_error",
        validation_message(errors),
        path=request.url.path,
        param=validation_param(errors),
    )


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    type_ = TYPE_BY_STATUS.get(exc.status_code, "http_error")
    response = error_response(exc.status_code, type_, str(exc.detail), path=request.url.path)
    response.headers.update(exc.headers or {})  # e.g. Allow on 405
    return response


class CatchAllMiddleware:
    """An unexpected exception becomes a logged 500 envelope, not a bare text 500.

    A middleware rather than an `Exception` handler: Starlette re-raises after such a handler,
    so the server would log every traceback a second time.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except ClientDisconnect:  # e.g. closed by a body deadline (serve.http): nobody to answer
            log.info("client went away during %s %s", scope.get("method"), scope.get("path"))
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for an envelope; let the server close the connection
                raise
            response = error_response(
                500, "internal_error", "internal server error", path=scope.get("path", "")
            )
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(UnknownIndexError, _on_unknown_index)
    app.add_exception_handler(IndexReadOnlyError, _on_read_only)
    app.add_exception_handler(JournalWriteError, _on_journal_write)
    app.add_exception_handler(Overloaded, _on_overloaded)
    app.add_exception_handler(VectorStoreUnavailable, _on_store_unavailable)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
    app.add_middleware(CatchAllMiddleware)
