"""Where a request's time went: waiting in the encode queue, and in forward passes.

The batcher measures each job's queue wait and the forward pass it shared (`record` adds them
to the request that awaited the job); `RequestMetricsMiddleware` starts a record per request and
answers with TEI's headers, so a client sees whether it is queue-bound or model-bound:

    x-queue-time: 0.412      (ms queued before its batch started)
    x-inference-time: 3.051  (ms of the forward passes it was part of)
    x-total-time: 4.630      (ms from the request's arrival to its answer)

A request with several jobs (texts and images) adds them up. The same split is in /metrics as
`duet_encode_queue_seconds` and `duet_encode_inference_seconds` histograms, per job kind.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

QUEUE_HEADER = "x-queue-time"
INFERENCE_HEADER = "x-inference-time"
TOTAL_HEADER = "x-total-time"
HEADERS = [QUEUE_HEADER, INFERENCE_HEADER, TOTAL_HEADER]


@dataclass(slots=True)
class RequestTiming:
    """Seconds one request spent queued for the encoder and in forward passes."""

    queue_s: float = 0.0
    inference_s: float = 0.0

    def headers(self, total_s: float) -> list[tuple[bytes, bytes]]:
        values = ((QUEUE_HEADER, self.queue_s), (INFERENCE_HEADER, self.inference_s))
        pairs = [(name.encode(), f"{seconds * 1000:.3f}".encode()) for name, seconds in values]
        return [*pairs, (TOTAL_HEADER.encode(), f"{total_s * 1000:.3f}".encode())]


# the record of the request being handled; tasks the handler starts share it (context copies)
_current: ContextVar[RequestTiming | None] = ContextVar("duet_request_timing", default=None)


def start_request() -> RequestTiming:
    """A new record for the request handled in this context."""
    timing = RequestTiming()
    _current.set(timing)
    return timing


def record(queue_s: float, inference_s: float) -> None:
    """Add a job's queue wait and forward-pass time to the current request, if any."""
    timing = _current.get()
    if timing is not None:
        timing.queue_s += queue_s
        timing.inference_s += inference_s
