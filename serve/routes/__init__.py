"""What the route modules share: the loaded service, settings and bounded reading of bodies.

Images arrive as multipart files or as base64 strings in JSON; both end as bytes checked against
`max_upload_bytes`, then decoded off the event loop (`decode_images`) with the pixel limit.

Bodies are read here, by hand, rather than by FastAPI's `Form`/`File` parameters: those spool an
upload of any size before a handler can refuse it, and /search takes either JSON or multipart.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

import numpy as np
import pydantic
from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.types import Message

from common.preprocess import ImageTooLargeError, InvalidImageError, load_image
from serve.batching import EncodeBatcher
from serve.encoder import Encoder
from serve.errors import ApiError
from serve.labels import LabelCache, LabelSetEmbeddings
from serve.registry import IndexRegistry
from serve.settings import Settings

log = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Service:
    """What the loader builds and every request uses: model, batcher, indices, label sets."""

    encoder: Encoder
    batcher: EncodeBatcher
    indices: IndexRegistry
    label_sets: dict[str, LabelSetEmbeddings]
    label_cache: LabelCache = field(default_factory=LabelCache)

    def close(self) -> None:
        self.batcher.close()
        self.indices.close()


@dataclass(slots=True)
class ServiceState:
    """Set once by the background loader: `service` when loaded, or `error` saying why not."""

    service: Service | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class QuerySource:
    """A search's query: a text or a decoded image still to encode, or a [1, D] unit vector."""

    text: str | None = None
    image: Image.Image | None = None
    vector: np.ndarray | None = None


async def search_with(service: Service, source: QuerySource, find: Callable[[np.ndarray], T]) -> T:
    """`find(query vector [1, D])` off the event loop.

    A text or image is searched on the batcher's thread right after its batch is encoded, so a
    request hands off to another thread once, not twice; a given vector in the threadpool.
    """
    if source.text is not None:
        return await service.batcher.encode_then("text", [source.text], find)
    if source.image is not None:
        return await service.batcher.encode_then("image", [source.image], find)
    assert source.vector is not None
    return await run_in_threadpool(find, source.vector)


def service_of(request: Request) -> Service:
    """The loaded service, or 503 not_ready (with the load failure's reason if there was one)."""
    state: ServiceState = request.app.state.service
    if state.service is not None:
        return state.service
    if state.error is not None:
        raise ApiError(503, "not_ready", f"model or index failed to load: {state.error}")
    raise ApiError(503, "not_ready", "model and index are still loading")


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_service(request: Request) -> Service:
    return service_of(request)


async def get_settings(request: Request) -> Settings:
    return settings_of(request)


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


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
    """Base64 text (optionally a `data:...;base64,` URL) -> bytes; 413 if too large, else 422."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    data = "".join(data.split())  # line breaks of MIME-style base64
    check_image_bytes(len(data) // 4 * 3 - 2, f"{where} (decoded)", settings)  # before decoding
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "validation_error", f"{where}: not valid base64") from None
    check_image_bytes(len(decoded), f"{where} (decoded)", settings)
    return decoded


async def decode_images(files: list[bytes], settings: Settings) -> list[Image.Image]:
    """Decode images in the threadpool: decoding is CPU work and must not stall the event loop.
    Text-only requests have nothing to hand off."""
    if not files:
        return []
    return await run_in_threadpool(lambda: [decode_image(data, settings) for data in files])


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
