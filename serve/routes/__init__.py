"""What the route modules share: the loaded service, settings and bounded reading of bodies.

Bodies are read here, by hand, rather than by FastAPI's `Form`/`File` parameters: those spool an
upload of any size before a handler can refuse it, and /search takes either JSON or multipart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, TypeVar

import pydantic
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from starlette.datastructures import FormData, UploadFile
from starlette.types import Message

from common.preprocess import ImageTooLargeError, InvalidImageError, load_image
from serve.encoder import Encoder
from serve.errors import ApiError
from serve.index import SearchIndex
from serve.settings import Settings

log = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


@dataclass(frozen=True, slots=True)
class Service:
    """The loaded model and index that every request uses."""

    encoder: Encoder
    index: SearchIndex


@dataclass(slots=True)
class ServiceState:
    """Set once by the background loader: `service` when loaded, or `error` saying why not."""

    service: Service | None = None
    error: str | None = None


async def get_service(request: Request) -> Service:
    """The loaded service, or 503 not_ready (with the load failure's reason if there was one)."""
    state: ServiceState = request.app.state.service
    if state.service is not None:
        return state.service
    if state.error is not None:
        raise ApiError(503, "not_ready", f"model or index failed to load: {state.error}")
    raise ApiError(503, "not_ready", "model and index are still loading")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


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


async def read_form(request: Request, settings: Settings) -> FormData:
    """Parse a multipart body read within `settings.max_request_bytes`; at most one file."""
    body = await read_body(request, settings.max_request_bytes)

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    max_fields = settings.max_labels + settings.max_templates + 2
    # A Request over the bytes already read: Starlette's parser, with nothing left unbounded.
    return await Request(request.scope, replay).form(max_files=1, max_fields=max_fields)


async def read_upload(form: FormData, field: str, settings: Settings) -> bytes:
    """The bytes of file field `field`: 422 if absent, 413 if over `max_upload_bytes`."""
    upload = form.get(field)
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "validation_error", f"body.{field}: a file field {field!r} is required")
    data = await upload.read()
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            413,
            "too_large",
            f"upload {field!r} is {len(data)} bytes; the limit is {settings.max_upload_bytes}",
        )
    return data


def decode_image(data: bytes, settings: Settings) -> Image.Image:
    """Uploaded bytes -> RGB image; 413 over the pixel limit, 415 if not an image. CPU work."""
    try:
        return load_image(data, max_pixels=settings.max_image_pixels)
    except ImageTooLargeError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from exc
    except InvalidImageError as exc:
        # PIL's reason names internal objects ("cannot identify image file <_io.BytesIO ...>").
        log.info("refused upload: %s", exc)
        raise ApiError(
            415, "not_an_image", "the upload is not a decodable image (send JPEG, PNG or WebP)"
        ) from exc


def validate(model: type[ModelT], data: dict[str, object], settings: Settings) -> ModelT:
    """Validate form fields against `model` with the settings' limits; errors become a 422."""
    try:
        return model.model_validate(data, context={"settings": settings})
    except pydantic.ValidationError as exc:
        raise as_request_error(exc) from None


def as_request_error(exc: pydantic.ValidationError) -> RequestValidationError:
    """A body's validation error, located under `body` like FastAPI's own."""
    errors = exc.errors(include_url=False)
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors])
