"""The decode queue: request images wait here for the decode threads, charged by their pixels.

A request's images are admitted together, before the first is decoded, with the decoded pixels
their headers announce (`ImageHeader.charged_pixels`). Admission is refused (429 with
Retry-After, `Overloaded`) when the images already waiting or being decoded would come to more
than `max_decode_pixels`: a flood of large images gets a fast 429 instead of a queue that
everyone waits behind, and an admitted image waits at most the time to decode that budget.

Two lanes, so that a small image never waits behind a large one: images up to
`small_image_pixels` are "small". `threads` general threads take the oldest image of either lane;
one more thread, at normal priority, takes only small ones. Each lane has its own
`max_decode_pixels`, so a flood of large images cannot get small ones refused (nor the reverse).
The full-size images in memory are at most `threads` large ones and one small one.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from serve.batching import Overloaded

T = TypeVar("T")
SMALL, LARGE = 0, 1  # lanes
DEFAULT_SMALL_IMAGE_PIXELS = 4_000_000  # ~2300 x 1700: decoded in tens of ms
DEFAULT_MAX_DECODE_PIXELS = 400_000_000  # two full requests; ~4 s of decoding on two idle threads


@dataclass(slots=True)
class _Job(Generic[T]):
    order: int  # admission order: general threads take the oldest first
    run: Callable[[], T]
    future: Future[T] = field(default_factory=Future)


class DecodeQueue:
    """Decode threads fed by two lanes, with admission charged in decoded pixels."""

    def __init__(
        self,
        threads: int,
        *,
        small_image_pixels: int,
        max_decode_pixels: int,
        thread_setup: Callable[[], None] = lambda: None,
    ) -> None:
        """`thread_setup` runs first on each general thread (the service lowers their priority);
        the small-image thread keeps the process's priority: its images are quick, and someone
        waits for each of them."""
        self.small_image_pixels = small_image_pixels
        self.max_decode_pixels = max_decode_pixels
        self.pending_pixels = [0, 0]  # per lane: admitted, not yet decoded (event loop only)
        self._lanes: tuple[deque[_Job[Any]], deque[_Job[Any]]] = (deque(), deque())
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(
                target=self._work,
                args=(small_only, thread_setup),
                name=f"duet-decode-{'small' if small_only else n}",
                daemon=True,
            )
            for n, small_only in enumerate([False] * threads + [True])
        ]
        for thread in self._threads:
            thread.start()

    def lane(self, pixels: int) -> int:
        return SMALL if pixels <= self.small_image_pixels else LARGE

    def admit(self, pixels: Sequence[int]) -> Admission:
        """Charge a request's images (their decoded pixels, in order); `Overloaded` if a lane
        would go over `max_decode_pixels`. A lane with nothing pending admits any request."""
        added = [0, 0]
        for count in pixels:
            added[self.lane(count)] += count
        for lane, count in enumerate(added):
            pending = self.pending_pixels[lane]
            if count and pending and pending + count > self.max_decode_pixels:
                name = "small" if lane == SMALL else "large"
                raise Overloaded(
                    f"{pending} decoded pixels of {name} images are waiting to be decoded; this "
                    f"request's {count} would pass max_decode_pixels ({self.max_decode_pixels})"
                )
        for lane, count in enumerate(added):
            self.pending_pixels[lane] += count
        return Admission(self, list(pixels))

    def _submit(self, pixels: int, run: Callable[[], T]) -> Future[T]:
        job = _Job(next(self._order), run)
        with self._ready:
            if self._closed:
                raise RuntimeError("the decode queue is closed")
            self._lanes[self.lane(pixels)].append(job)
            self._ready.notify_all()
        return job.future

    def _take(self, small_only: bool) -> _Job[Any] | None:
        """The next job for a thread (None: closed); waits while there is none."""
        small, large = self._lanes
        with self._ready:
            while not self._closed and not (small or (large and not small_only)):
                self._ready.wait()
            if self._closed:
                return None
            if small_only or not large or (small and small[0].order < large[0].order):
                return small.popleft()
            return large.popleft()

    def _work(self, small_only: bool, setup: Callable[[], None]) -> None:
        if not small_only:
            setup()
        while (job := self._take(small_only)) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue  # its request is gone: nobody waits for this image
            try:
                job.future.set_result(job.run())
            except BaseException as exc:  # the request's own failure (413/415): its to raise
                job.future.set_exception(exc)

    def close(self) -> None:
        """Stop the threads after their current image; waiting images are cancelled."""
        with self._ready:
            self._closed = True
            for lane in self._lanes:
                for job in lane:
                    job.future.cancel()
                lane.clear()
            self._ready.notify_all()


class Admission:
    """One request's admitted images: decode them in order; each image's charge is returned
    when its decode ends, the rest when the request ends (`close`, or the `with` block)."""

    def __init__(self, queue: DecodeQueue, pixels: list[int]) -> None:
        self._queue, self._pixels, self._next = queue, pixels, 0

    async def decode(self, run: Callable[[], T]) -> T:
        """Run the request's next image's decode (`run`) on the decode threads."""
        pixels = self._pixels[self._next]
        try:
            return await asyncio.wrap_future(self._queue._submit(pixels, run))
        finally:
            self._release(self._next, self._next + 1)
            self._next += 1

    def _release(self, start: int, stop: int) -> None:
        for count in self._pixels[start:stop]:
            self._queue.pending_pixels[self._queue.lane(count)] -= count

    def close(self) -> None:
        self._release(self._next, len(self._pixels))
        self._next = len(self._pixels)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
