"""Request images -> model-sized tensors, charged by the cost model before anything is decoded.

Every image's header is read first (format, size, mode): a format outside ACCEPTED_FORMATS gets
415 and one over a pixel budget 413, before any pixel is decoded. The request's images are then
admitted to the service's decode queue (serve.decoding: 429 when too many decoded pixels are
already waiting) and decoded one per hand-off: a request's full-size image lives only until its
small [3, H, W] tensor exists, so N images in one request never mean N full-size images in
memory, and a request with many images waits between its images while other requests' images
are decoded. An image that cannot be decoded or resized fails its own request (413/415) before
anything is batched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading

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
from serve.service import Service
from serve.settings import Settings

log = logging.getLogger(__name__)

NOT_AN_IMAGE = f"the upload is not a decodable image (send {FORMAT_NAMES})"
DECODE_NICENESS = 10  # decode threads yield the CPU to the encoder and the event loop
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 8 * 1024 * 1024


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
    """Make glibc serve allocations over 8 MiB by mmap, so freeing one returns it to the OS.

    A decoded image is a few hundred MiB in 16 MiB blocks. By default glibc raises its mmap
    threshold after the first such block is freed, later blocks come from the heap, and the
    process keeps ~0.5 GB after a burst of large images. A fixed threshold ends that (measured:
    +470 MiB kept after 16 decodes of 6000 x 6000 images without it, +7 MiB with it).
    Process-wide; False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


async def prepare_images(
    files: list[bytes], service: Service, settings: Settings
) -> list[torch.Tensor]:
    """Each image's model input [3, H, W], in order; 413/415/429 before decoding where possible.

    Text-only requests have nothing to hand off.
    """
    if not files:
        return []
    limit = resize_limit(settings, service.encoder.preprocess_cfg)
    # every header before the first decode: the request's total is charged up front
    headers = await run_in_threadpool(lambda: [read_image_header(data) for data in files])
    charge_image_sizes(headers, settings, limit)
    with service.decoder.admit([header.charged_pixels for header in headers]) as admission:
        return [
            await admission.decode(
                functools.partial(preprocess_image, data, service.encoder, settings, limit)
            )
            for data in files
        ]


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
    data: bytes, encoder: Encoder, settings: Settings, limit: ResizeLimit
) -> torch.Tensor:
    """Bytes -> the model's [3, H, W] input; the decoded image is dropped on return. CPU work."""
    try:
        image = load_image(data, max_pixels=settings.max_image_pixels, resize=limit)
    except ImageTooLargeError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from exc
    except InvalidImageError as exc:
        # PIL's reason names internal objects ("cannot identify image file <_io.BytesIO ...>").
        log.info("refused upload: %s", exc)
        raise ApiError(415, "not_an_image", NOT_AN_IMAGE) from exc
    try:
        return encoder.preprocess(image)
    except (OSError, ValueError, OverflowError, MemoryError) as exc:
        # e.g. a truncated file that PIL only notices while resizing: this request's fault alone
        log.info("an upload could not be preprocessed: %r", exc)
        raise ApiError(415, "not_an_image", f"{NOT_AN_IMAGE}; it could not be resized") from exc
