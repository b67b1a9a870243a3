"""Dynamic batching: concurrent requests' texts and images share forward passes on one thread.

Requests await `EncodeBatcher.encode_texts/encode_images`; each call becomes a job on a bounded
queue. One worker thread (so encoding never runs on the event loop, and forward passes never
interleave) takes the oldest job and adds queued jobs of the same kind until the batch holds
`max_batch_size` items, then encodes the batch once and hands each job its own rows.

When to wait for more: only while the service is busy (the previous batch held more than one
job) does a batch wait up to `max_wait_ms` for company; a lone request at low load is encoded at
once instead of paying the wait. Under load, jobs also pile up while a batch is being encoded,
so batches fill without waiting at all.

A job may carry `then`, a function of its own rows run on the worker thread right after the
forward pass (the search of a /search request): the caller gets `then`'s value, and the request
makes one thread hand-off instead of two. An exception in `then` fails that job only.

The worker thread runs forward passes only. Texts are tokenized before they are queued, on a
threadpool thread of the request (`tokenize`; bounded per text by `common.tokenize`), and images
arrive already preprocessed (model-sized tensors): a request's tokenizing or decoding costs
that request's time, not everyone's. An image that cannot be decoded or resized fails its own
request before it is queued. If a batched forward pass still fails, the batch is split in
halves and retried until only the guilty job fails.

With `batching=False` every job is encoded on its own (the same thread and queue, one job per
forward pass), which is the baseline the benchmark compares against.

The queue is bounded by cost, in encode items (one text or one image each; see `serve.cost`): a
job that would take it over `max_queue_items` is refused with `Overloaded` (HTTP 429 with
Retry-After) instead of making everyone wait longer. A job is admitted into an empty queue
whatever its size, so no request is refused forever. Bulk work (a /classify's label prompts) is
submitted in small chunks, one at a time, so it never fills the queue; a bulk chunk gives way to
interactive jobs queued after it until it has waited `BULK_MAX_WAIT_S`, and only joins other bulk
chunks in a batch, so a large label set slows others' searches by little.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from serve import timing
from serve.encoder import Encoder

log = logging.getLogger(__name__)

T = TypeVar("T")
JobKind = Literal["text", "image", "call"]
# A bulk job waits at most this long for interactive jobs queued after it: with chunks of a few
# milliseconds of encoding, bulk work gets a small share of a saturated encoder and never starves.
BULK_MAX_WAIT_S = 0.05


class Overloaded(RuntimeError):
    """The encode queue is full: the request should be retried later (HTTP 429)."""


class BatchObserver(Protocol):
    """Where batch sizes, queue depth and job timings go (the Prometheus metrics, or nothing)."""

    def observe_batch(self, kind: str, items: int, jobs: int) -> None: ...

    def set_queue_depth(self, items: int) -> None: ...

    def observe_job(self, kind: str, queue_s: float, inference_s: float) -> None: ...


class _NoObserver:
    def observe_batch(self, kind: str, items: int, jobs: int) -> None:
        pass

    def set_queue_depth(self, items: int) -> None:
        pass

    def observe_job(self, kind: str, queue_s: float, inference_s: float) -> None:
        pass


@dataclass(slots=True)
class _Job:
    kind: JobKind
    items: Sequence[Any]  # texts' [C] token ids or preprocessed [3, H, W] images; "call": empty
    size: int  # what the job counts against the queue bound
    call: Callable[[], Any] | None = None
    then: Callable[[np.ndarray], Any] | None = None  # applied to the job's rows, on the worker
    # set by the caller's event loop; the worker hands results back to that loop
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[Any] | None = None
    bulk: bool = False  # yields to interactive jobs (see `_take_first`)
    queued_at_s: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0  # set by the worker: waited before its batch started ...
    inference_s: float = 0.0  # ... and the forward passes (or the call) it was part of


class EncodeBatcher:
    """Encodes texts and images for many concurrent callers, batching them (see module doc)."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue_items: int = 512,
        batching: bool = True,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_items < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue_items must be >= 1, max_wait_ms >= 0")
        self.encoder = encoder
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue_items = max_queue_items
        self.batching = batching
        self._observer = observer or _NoObserver()
        self._queue: deque[_Job] = deque()
        self._pending_items = 0  # queued or being encoded
        self._busy = False  # the previous batch held more than one job
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="duet-encoder", daemon=True)
        self._worker.start()

    @property
    def pending_items(self) -> int:
        with self._cond:
            return self._pending_items

    async def encode_texts(self, texts: Sequence[str], *, bulk: bool = False) -> np.ndarray:
        """N texts -> [N, D] unit vectors, encoded together with other callers' texts.

        `bulk`: part of a large piece of work (a /classify's label prompts) that should give way
        to interactive requests; it is still encoded within `BULK_MAX_WAIT_S` of being queued.
        """
        return await self.encode_tokens(await self.tokenize(texts), bulk=bulk)

    async def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """N texts -> [N, C] token ids, on a threadpool thread (neither the event loop nor the
        encoder thread): a request's tokenizing is its own cost."""
        if not texts:
            return torch.zeros((0, 0), dtype=torch.long)
        return await run_in_threadpool(self.encoder.tokenize, list(texts))

    async def encode_tokens(self, tokens: torch.Tensor, *, bulk: bool = False) -> np.ndarray:
        """[N, C] token ids (`tokenize`) -> [N, D] unit vectors; `bulk` as in `encode_texts`."""
        return await self._await(_Job("text", list(tokens), len(tokens), bulk=bulk))

    async def encode_images(self, pixels: Sequence[torch.Tensor]) -> np.ndarray:
        """N preprocessed [3, H, W] images (`Encoder.preprocess`) -> [N, D] unit vectors, encoded
        together with other callers' images."""
        return await self._await(_Job("image", list(pixels), len(pixels)))

    async def encode_then(
        self, kind: Literal["text", "image"], items: Sequence[Any], then: Callable[[np.ndarray], T]
    ) -> T:
        """`then([N, D] vectors of items)`, run on the worker thread after the batch's encoding;
        `items` are texts (tokenized first) or preprocessed images."""
        if not items:
            raise ValueError("encode_then needs at least one text or image")
        if kind == "text":
            items = list(await self.tokenize(items))
        result: T = await self._await(_Job(kind, list(items), len(items), then=then))
        return result

    async def run(self, call: Callable[[], T], cost_items: int) -> T:
        """Run `call` alone on the encoder thread (e.g. embedding a request's label prompts)."""
        result: T = await self._await(_Job("call", [], max(1, cost_items), call=call))
        return result

    def close(self) -> None:
        """Stop the worker once the queued jobs are done; later calls raise RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    async def _await(self, job: _Job) -> Any:
        if job.kind != "call" and not job.items:
            return np.zeros((0, self.encoder.embed_dim), np.float32)
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        self._submit(job)
        try:
            return await job.future
        finally:
            timing.record(job.queue_s, job.inference_s)  # the request's x-queue-time etc.

    def _submit(self, job: _Job) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the encoder is shut down")
            if self._pending_items > 0 and self._pending_items + job.size > self.max_queue_items:
                raise Overloaded(
                    f"{self._pending_items} items are waiting to be encoded (limit "
                    f"{self.max_queue_items}); retry shortly"
                )
            self._queue.append(job)
            self._pending_items += job.size
            self._observer.set_queue_depth(self._pending_items)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # a caller that went away (its task cancelled: the client disconnected) is skipped
            live = [job for job in batch if job.future is not None and not job.future.cancelled()]
            try:
                outcome = self._execute_timed(live) if live else []
            except Exception as exc:  # a fault outside the jobs' own work: their batch fails,
                log.exception("the encoder's batch handling failed")  # the worker lives on
                outcome = [exc] * len(live)
            with self._cond:  # before the results: a caller that has its result sees it counted
                self._pending_items -= sum(job.size for job in batch)
                self._observer.set_queue_depth(self._pending_items)
            _hand_back(list(zip(live, outcome, strict=True)))

    def _next_batch(self) -> list[_Job] | None:
        """The oldest job plus queued jobs of its kind, up to max_batch_size items."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._take_first()]
            if batch[0].kind == "call" or not self.batching:
                return batch
            size = batch[0].size
            deadline = time.monotonic() + (self.max_wait_s if self._busy else 0.0)
            while size < self.max_batch_size:
                job = self._take_fitting(batch[0].kind, self.max_batch_size - size, batch[0].bulk)
                if job is not None:
                    batch.append(job)
                    size += job.size
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._busy = len(batch) > 1
            return batch

    def _take_first(self) -> _Job:
        """The oldest job, but a bulk job only if no interactive job waits or it has waited
        `BULK_MAX_WAIT_S`: interactive requests go first, bulk work still progresses."""
        oldest = self._queue[0]
        if oldest.bulk and time.monotonic() - oldest.queued_at_s < BULK_MAX_WAIT_S:
            interactive = next((job for job in self._queue if not job.bulk), None)
            if interactive is not None:
                self._queue.remove(interactive)
                return interactive
        return self._queue.popleft()

    def _take_fitting(self, kind: JobKind, room: int, bulk: bool) -> _Job | None:
        """A queued job of `kind` that fits in `room`; bulk jobs only join bulk batches."""
        for job in self._queue:
            if job.kind == kind and job.size <= room and (bulk or not job.bulk):
                self._queue.remove(job)
                return job
        return None

    def _execute_timed(self, live: list[_Job]) -> list[Any]:
        """`_execute`, with each job's queue wait and forward-pass time measured and observed."""
        started = time.monotonic()
        for job in live:
            job.queue_s = started - job.queued_at_s
        outcome = self._execute(live)
        for job in live:
            self._observer.observe_job(job.kind, job.queue_s, job.inference_s)
        return outcome

    def _execute(self, live: list[_Job]) -> list[Any]:
        """Each job's result (its rows, or the call's value), or its own exception."""
        if live[0].kind == "call":
            assert live[0].call is not None
            start = time.monotonic()
            try:
                return [live[0].call()]
            except Exception as exc:  # handed to its caller; the worker goes on
                log.exception("a call on the encoder thread failed")
                return [exc]
            finally:
                live[0].inference_s = time.monotonic() - start
        self._observer.observe_batch(live[0].kind, sum(job.size for job in live), len(live))
        return self._encode_isolated(live)

    def _encode_isolated(self, jobs: list[_Job]) -> list[Any]:
        """Encode `jobs` together; if that fails, halve and retry, so only the guilty job fails.

        Items are preprocessed before they are queued, so a failure here is rare; but one
        request's item must never fail the other requests of its batch.
        """
        start = time.monotonic()
        try:
            vectors = self._encode(jobs[0].kind, [item for job in jobs for item in job.items])
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("encoding one job of %d items failed", jobs[0].size)
                return [exc]
            log.warning("a batch of %d jobs failed (%s); retrying in halves", len(jobs), exc)
            half = len(jobs) // 2
            return self._encode_isolated(jobs[:half]) + self._encode_isolated(jobs[half:])
        for job in jobs:  # the forward passes they shared (a retried job: its last attempt)
            job.inference_s = time.monotonic() - start
        offsets = np.cumsum([0] + [job.size for job in jobs])
        rows = [vectors[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        return [_finish(job, job_rows) for job, job_rows in zip(jobs, rows, strict=True)]

    def _encode(self, kind: JobKind, items: list[Any]) -> np.ndarray:
        """[len(items), D]: texts' token ids, or preprocessed images, in slices of at most
        max_batch_size (a job larger than the batch size is alone in its batch)."""
        encode = self.encoder.encode_tokens if kind == "text" else self.encoder.encode_pixels
        return np.concatenate(
            [
                encode(items[start : start + self.max_batch_size])
                for start in range(0, len(items), self.max_batch_size)
            ]
        )


def _hand_back(results: list[tuple[_Job, Any]]) -> None:
    """Resolve the jobs' futures on their event loops: one wake-up per loop, not per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any]]] = {}
    for job, result in results:
        assert job.loop is not None
        by_loop.setdefault(job.loop, []).append((job, result))
    for loop, jobs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, jobs)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            log.debug("dropping %d results for a closed event loop", len(jobs))


def _resolve(jobs: list[tuple[_Job, Any]]) -> None:
    """On the event loop: each job's future gets its result or exception (unless cancelled)."""
    for job, result in jobs:
        future = job.future
        assert future is not None
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _finish(job: _Job, rows: np.ndarray) -> Any:
    """The job's rows, or `job.then(rows)`; an exception there is this job's result alone."""
    if job.then is None:
        return rows
    try:
        return job.then(rows)
    except Exception as exc:
        return exc
