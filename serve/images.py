"""Request images -> model-sized tensors, charged by the cost model before anything is decoded.

Every image's header is read first (format, size, mode): a format outside ACCEPTED_FORMATS gets
415 and one over a pixel budget 413, before any pixel is decoded. The request's images are then
admitted to the service's decode queue (serve.decoding: 429 when too many decoded pixels are
already waiting) and decoded one per hand-off: a request's full-size image lives only until its
small [3, H, W] tensor exists, so N images in one request never mean N full-size images in
memory, and a request with many images waits between its images while other requests' images
are decoded. An image that cannot be decoded or resized fails its own request (413/415) before
anything is batched. Where a route asks (adding images to an index), the same decode also makes
each image's thumbnail, so an image is decoded once. `download_image` fetches an `image_url`
(serve.fetch) for the routes that take one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from starlette.concurrency import run_in_threadpool

from common.preprocess import (
    FORMAT_NAMES,
    ImageHeader,
    ImageTooLargeError,
    InvalidImageError,
    ResizeLimit,
    load_image,
    read_header,
)
from serve.cost import charge_image_sizes, resize_limit
from serve.encoder import Encoder
from serve.errors import ApiError
from serve.fetch import FetchError, fetch_image, parse_networks
from serve.indexing.thumbnails import ThumbnailSpec, make_thumbnail
from serve.service import Service
from serve.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

NOT_AN_IMAGE = f"the upload is not a decodable image (send {FORMAT_NAMES})"
DECODE_NICENESS = 10  # decode threads yield the CPU to the encoder and the event loop
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def lower_decode_priority() -> None:
    """Run this thread (a decode pool's) at niceness +DECODE_NICENESS, where the OS allows.

    Decoding a large image is seconds of CPU; at equal priority a stream of them takes the cores
    from the encoder that every request waits on. Niced, decoding uses what the encoder leaves.
    Linux schedules threads apart, so this touches the calling thread only.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted
        log.debug("decode threads keep their priority: %s", exc)


def return_large_frees_to_os() -> bool:
    """Make glibc serve allocations over 1 MiB by mmap, so freeing one returns it to the OS.

    A decoded image is a few hundred MiB in 16 MiB blocks, a /metadata answer several MB. By
    default glibc raises its mmap threshold after the first such block is freed, later blocks
    come from the heap, and the process keeps what a burst of them took (measured: +470 MiB kept
    after 16 decodes of 6000 x 6000 images without it, +7 MiB with it; +58 to +120 MiB after 20
    unread 7 MB /metadata answers with an 8 MiB threshold, +0 with 1 MiB). The cost is an mmap
    and fresh pages per such allocation: /metadata took the same 76 ms either way.
    Process-wide; False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """A request image ready for the encoder, and its thumbnail when one was asked for."""

    pixels: torch.Tensor  # [3, H, W], the model's input
    thumbnail: bytes | None = None


async def prepare_images(
    files: list[bytes], service: Service, settings: Settings
) -> list[torch.Tensor]:
    """Each image's model input [3, H, W], in order; 413/415/429 before decoding where possible.

    Text-only requests have nothing to hand off.
    """
    return [image.pixels for image in await prepare_images_for(files, service, settings)]


async def prepare_images_for(
    files: list[bytes],
    service: Service,
    settings: Settings,
    *,
    thumbnail_spec: ThumbnailSpec | None = None,
    names: Sequence[str] | None = None,
) -> list[PreparedImage]:
    """`prepare_images`, each image also shrunk to a thumbnail by `thumbnail_spec` (if given)
    from the same decode; `names` (one per image, e.g. "body.items.3.image") prefix each error
    message, so that a client knows which image was refused."""
    if not files:
        return []
    limit = resize_limit(settings, service.encoder.preprocess_cfg)
    labels = list(names) if names is not None else [""] * len(files)
    # every header before the first decode: the request's total is charged up front
    headers = await run_in_threadpool(
        lambda: [
            _named(label, read_image_header, data)
            for data, label in zip(files, labels, strict=True)
        ]
    )
    charge_image_sizes(headers, settings, limit, names)
    with service.decoder.admit([header.charged_pixels for header in headers]) as admission:
        return [
            await admission.decode(
                functools.partial(
                    _named,
                    label,
                    preprocess_image,
                    data,
                    service.encoder,
                    settings,
                    limit,
                    thumbnail_spec,
                )
            )
            for data, label in zip(files, labels, strict=True)
        ]


def _named(name: str, run: Callable[..., T], *args: Any) -> T:
    """`run(*args)`, its ApiError's message prefixed by `name` (when there is one)."""
    try:
        return run(*args)
    except ApiError as exc:
        if name:
            raise ApiError(exc.status, exc.type, f"{name}: {exc.message}", exc.headers) from None
        raise


async def download_image(url: str, settings: Settings) -> bytes:
    """An `image_url`'s bytes (serve.fetch: public hosts only, within `max_upload_bytes` and
    `image_url_timeout_s`); 400 when fetching is off or fails."""
    if not settings.image_url_fetch:
        raise ApiError(
            400,
            "bad_request",
            "image_url fetching is off on this service (DUET_IMAGE_URL_FETCH); send the image "
            "itself as base64 in `image`",
        )
    try:
        return await fetch_image(
            url,
            max_bytes=settings.max_upload_bytes,
            timeout_s=settings.image_url_timeout_s,
            allowed=parse_networks(settings.image_url_allowed_networks),
        )
    except FetchError as exc:
        raise ApiError(exc.status, exc.type, str(exc)) from None


def read_image_header(data: bytes) -> ImageHeader:
    """The image's header; 415 if it is not an accepted image. Cheap: nothing is decoded."""
    try:
        return read_header(data)
    except ImageTooLargeError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from exc
    except InvalidImageError as exc:
        log.info("refused upload: %s", exc)
        raise ApiError(415, "not_an_image", NOT_AN_IMAGE) from exc


def preprocess_image(
    data: bytes,
    encoder: Encoder,
    settings: Settings,
    limit: ResizeLimit,
    thumbnail_spec: ThumbnailSpec | None = None,
) -> PreparedImage:
    """Bytes -> the model's [3, H, W] input (and the thumbnail, by `thumbnail_spec`); the
    decoded image is dropped on return. CPU work."""
    try:
        image = load_image(data, max_pixels=settings.max_image_pixels, resize=limit)
    except ImageTooLargeError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from exc
    except InvalidImageError as exc:
        # PIL's reason names internal objects ("cannot identify image file <_io.BytesIO ...>").
        log.info("refused upload: %s", exc)
        raise ApiError(415, "not_an_image", NOT_AN_IMAGE) from exc
    try:
        pixels = encoder.preprocess(image)
        thumbnail = None if thumbnail_spec is None else make_thumbnail(image, thumbnail_spec)
    except (OSError, ValueError, OverflowError, MemoryError) as exc:
        # e.g. a truncated file that PIL only notices while resizing: this request's fault alone
        log.info("an upload could not be preprocessed: %r", exc)
        raise ApiError(415, "not_an_image", f"{NOT_AN_IMAGE}; it could not be resized") from exc
    return PreparedImage(pixels, thumbnail)
