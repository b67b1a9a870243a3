"""A build's images decoded within the service's bounds and preprocessed, in worker processes
that run ahead of the encoder.

Each image is decoded once, by the service's rule (`common.preprocess.decode_or_skip`: header
first, nothing decoded over the bounds), and turned into the model's [3, H, W] input and its
thumbnail; an image that cannot be is a skip reason instead. With `workers` > 0 this runs in
that many processes, each with one torch thread, at most `AHEAD_PER_WORKER` images per worker
ahead of the encoder: while the encoder runs a batch, the workers prepare the next. On Linux the
workers are forked, as torch's DataLoader forks its workers, when the pool is made: before the
first image is encoded and before torchrun's process group exists, so they start in
milliseconds instead of importing torch again (seconds); elsewhere they are spawned. A worker
decodes one image at a time, so decoding holds at most workers x DUET_MAX_IMAGE_PIXELS x 8
bytes. The inputs are the same bytes and the code the same in a worker or not, so the vectors
are too.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult

import numpy as np
import torch
from open_clip.transform import PreprocessCfg

from common.preprocess import ResizeLimit, Transform, decode_or_skip, image_transform
from common.shards import RawSample
from serve.cost import resize_limit
from serve.indexing.thumbnails import ThumbnailSpec, make_thumbnail
from serve.settings import ImageLimits

AHEAD_PER_WORKER = 8


@dataclass(frozen=True, slots=True)
class ImageBounds:
    """The service's per-image bounds, held by every image a build reads (one rule): bytes
    before reading or decoding, decoded pixels and pixels once resized from the header."""

    max_image_bytes: int
    max_image_pixels: int
    resize: ResizeLimit

    @classmethod
    def of_service(cls, cfg: PreprocessCfg) -> ImageBounds:
        """The bounds a service holds, its DUET_* environment included (DUET_MAX_UPLOAD_BYTES,
        DUET_MAX_IMAGE_PIXELS, DUET_MAX_RESIZED_PIXELS); `cfg`: the model's preprocessing."""
        limits = ImageLimits()
        return cls(limits.max_upload_bytes, limits.max_image_pixels, resize_limit(limits, cfg))

    def manifest(self) -> dict[str, int]:
        return {
            "max_image_bytes": self.max_image_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_resized_pixels": self.resize.max_pixels,
        }


@dataclass(frozen=True, slots=True)
class PrepareSpec:
    """What preparing an image takes (sent to each worker once)."""

    cfg: PreprocessCfg  # the model's eval preprocessing
    bounds: ImageBounds
    thumbnails: ThumbnailSpec


@dataclass(frozen=True, slots=True)
class Prepared:
    """One image ready for the encoder, or why it was skipped."""

    pixels: np.ndarray | None  # [3, H, W] float32
    thumbnail: bytes = b""
    skipped: str | None = None


def prepare(data: bytes, key: str, spec: PrepareSpec, transform: Transform) -> Prepared:
    """Bytes -> the model's input and thumbnail, from one decode; or a skip reason."""
    skipped: Counter[str] = Counter()
    bounds = spec.bounds
    image = decode_or_skip(
        data, skipped, key=key, resize=bounds.resize, max_pixels=bounds.max_image_pixels
    )
    if image is None:
        return Prepared(None, skipped=next(iter(skipped)))
    try:
        pixels = transform(image)
        thumbnail = make_thumbnail(image, spec.thumbnails) if spec.thumbnails.enabled else b""
    except (OSError, ValueError, OverflowError, MemoryError):
        # e.g. a truncated file that Pillow only notices while resizing; the service says 415
        return Prepared(None, skipped="corrupt_image")
    return Prepared(pixels.numpy(), thumbnail)


_worker: tuple[PrepareSpec, Transform] | None = None  # each worker's own, set by _start


def _start(spec: PrepareSpec) -> None:
    global _worker
    torch.set_num_threads(1)  # the cores are the encoder's and the other workers'
    _worker = (spec, image_transform(spec.cfg, train=False))


def _prepare_in_worker(data: bytes, key: str) -> Prepared:
    assert _worker is not None, "worker not started"
    return prepare(data, key, *_worker)


class Preparer:
    """`prepare` over a stream of samples, in order: in `workers` processes, or in this one."""

    def __init__(self, spec: PrepareSpec, workers: int) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.spec, self.workers = spec, workers
        self._transform = image_transform(spec.cfg, train=False)
        self._pool: multiprocessing.pool.Pool | None = None
        if workers:
            method = "fork" if sys.platform == "linux" else "spawn"
            context = multiprocessing.get_context(method)
            self._pool = context.Pool(workers, initializer=_start, initargs=(spec,))

    def map(self, samples: Iterable[RawSample]) -> Iterator[tuple[RawSample, Prepared]]:
        """Each sample with its `Prepared`, in order; bounded look-ahead."""
        if self._pool is None:
            for sample in samples:
                yield sample, prepare(sample.image, sample.key, self.spec, self._transform)
            return
        pending: deque[tuple[RawSample, AsyncResult[Prepared]]] = deque()
        for sample in samples:
            job = self._pool.apply_async(_prepare_in_worker, (sample.image, sample.key))
            pending.append((sample, job))
            if len(pending) >= AHEAD_PER_WORKER * self.workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()

    def close(self) -> None:
        """Stop the workers (images still queued are dropped)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
