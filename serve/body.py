"""Bounded reading of request bodies (JSON, multipart, base64 images) and writing of answers.

Bodies are read here, by hand, rather than by FastAPI's `Form`/`File` parameters: those spool an
upload of any size before a handler can refuse it, and /search takes either JSON or multipart.
Every read stops at `max_request_bytes` (413) and every image at `max_upload_bytes` (413); how
long a body may take to arrive is bounded by the HTTP server (`serve.http`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import TypeVar

import pydantic
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.types import Message

from serve.errors import ApiError
from serve.settings import Settings

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)
# Bodies and base64 texts larger than this are parsed in the threadpool, not on the event loop.
INLINE_PARSE_BYTES = 256 * 1024
# Base64 is decoded this many characters at a time (a multiple of 4): ~1 ms of work each.
BASE64_PIECE_CHARS = 1024 * 1024


def json_response(body: pydantic.BaseModel, headers: Mapping[str, str] | None = None) -> Response:
    """`body` serialised once by pydantic-core, skipping FastAPI's re-validation of a return value
    against `response_model` (which stays on the route for the API docs)."""
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


def media_type(request: Request) -> str:
    """`multipart/form-data; boundary=...` -> `multipart/form-data`."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing with 413 by Content-Length up front or as soon as more arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _body_too_large(max_bytes)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise _body_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "too_large", f"request body is over the limit of {max_bytes} bytes")


async def read_json(request: Request, model: type[ModelT], settings: Settings) -> ModelT:
    """A JSON body read within `max_request_bytes`, validated with the settings' limits (422)."""
    body = await read_body(request, settings.max_request_bytes)
    if len(body) > INLINE_PARSE_BYTES:  # megabytes of JSON: parse in the threadpool
        return await run_in_threadpool(_validate_json, model, body, settings)
    return _validate_json(model, body, settings)


def _validate_json(model: type[ModelT], body: bytes, settings: Settings) -> ModelT:
    try:
        return model.model_validate_json(body, context={"settings": settings})
    except pydantic.ValidationError as exc:
        raise as_request_error(exc) from None


async def read_form(request: Request, settings: Settings, max_files: int = 1) -> FormData:
    """Parse a multipart body read within `settings.max_request_bytes`; at most `max_files`."""
    body = await read_body(request, settings.max_request_bytes)

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    max_fields = settings.max_labels + settings.max_templates + settings.max_items_per_request + 4
    # A Request over the bytes already read: Starlette's parser, with nothing left unbounded.
    return await Request(request.scope, replay).form(max_files=max_files, max_fields=max_fields)


async def read_upload(form: FormData, field: str, settings: Settings) -> bytes:
    """The bytes of file field `field`: 422 if absent, 413 if over `max_upload_bytes`."""
    (data,) = await read_uploads(form, field, settings)
    return data


async def read_uploads(
    form: FormData, field: str, settings: Settings, *, required: bool = True
) -> list[bytes]:
    """The bytes of every file in field `field` (repeated): 422 if none, 413 if one is too large."""
    uploads = [upload for upload in form.getlist(field) if isinstance(upload, UploadFile)]
    if required and not uploads:
        raise ApiError(422, "validation_error", f"body.{field}: a file field {field!r} is required")
    files = []
    for upload in uploads:
        data = await upload.read()
        check_image_bytes(len(data), f"upload {field!r}", settings)
        files.append(data)
    return files


def check_image_bytes(size: int, what: str, settings: Settings) -> None:
    if size > settings.max_upload_bytes:
        raise ApiError(
            413, "too_large", f"{what} is {size} bytes; the limit is {settings.max_upload_bytes}"
        )


def decode_base64(data: str, where: str, settings: Settings) -> bytes:
    """Base64 text (optionally a `data:...;base64,` URL) -> bytes; 413 if too large, else 422.

    Decoded a piece at a time, refused as soon as the bytes so far are over the limit: a body
    of megabytes of base64 costs at most the limit's worth of work."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    # what the text would decode to, from its length alone: a text far over the limit is refused
    # before any decoding (str.count runs at memory speed; MIME base64 breaks its lines)
    chars = len(data) - sum(data.count(space) for space in " \r\n\t")
    check_image_bytes(chars // 4 * 3 - 2, f"{where} (decoded)", settings)
    pieces: list[bytes] = []
    decoded_bytes = 0
    carry = ""  # characters past the last whole 4-character group of the previous piece
    for start in range(0, len(data), BASE64_PIECE_CHARS):
        last = start + BASE64_PIECE_CHARS >= len(data)
        text = carry + "".join(data[start : start + BASE64_PIECE_CHARS].split())  # MIME breaks
        whole = len(text) if last else len(text) // 4 * 4
        text, carry = text[:whole], text[whole:]
        if not last and "=" in text:  # padding before the end
            raise ApiError(422, "validation_error", f"{where}: not valid base64")
        pieces.append(_b64decode(text, where))
        decoded_bytes += len(pieces[-1])
        check_image_bytes(decoded_bytes, f"{where} (decoded)", settings)
    if carry:
        raise ApiError(422, "validation_error", f"{where}: not valid base64")
    return b"".join(pieces)


async def decode_base64_off_loop(data: str, where: str, settings: Settings) -> bytes:
    """`decode_base64`, in the threadpool when `data` is large: its pieces then interleave
    with the event loop's work instead of stalling every connection for the whole decode."""
    if len(data) <= INLINE_PARSE_BYTES:
        return decode_base64(data, where, settings)
    return await run_in_threadpool(decode_base64, data, where, settings)


def _b64decode(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "validation_error", f"{where}: not valid base64") from None


def validate(model: type[ModelT], data: Mapping[str, object], settings: Settings) -> ModelT:
    """Validate form fields against `model` with the settings' limits; errors become a 422."""
    try:
        return model.model_validate(data, context={"settings": settings})
    except pydantic.ValidationError as exc:
        raise as_request_error(exc) from None


def as_request_error(exc: pydantic.ValidationError) -> RequestValidationError:
    """A body's validation error, located under `body` like FastAPI's own."""
    errors = exc.errors(include_url=False)
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors])
