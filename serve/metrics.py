"""Prometheus metrics of one app, and the middleware that counts, times and logs every request.

Each app has its own `CollectorRegistry` (not prometheus-client's global one), so several apps in
one process — the tests — do not collide. With several uvicorn workers each worker has its own
metrics; /metrics shows the worker that answered.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import timing

access_log = logging.getLogger("serve.access")

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The service's metrics; `registry` is what GET /metrics exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds (Linux)
        ProcessCollector(registry=self.registry)
        labels = ("route", "method", "status")
        self.requests = Counter(
            "duet_http_requests", "HTTP requests answered", labels, registry=self.registry
        )
        self.latency = Histogram(
            "duet_http_request_duration_seconds",
            "Time from request to the end of the response",
            labels,
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_items = Histogram(
            "duet_encode_batch_size",
            "Texts or images per forward pass",
            ("kind",),
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_jobs = Histogram(
            "duet_encode_batch_requests",
            "Requests (jobs) sharing one forward pass",
            ("kind",),
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "duet_encode_queue_seconds",
            "Time a job (a request's texts or images) waited before its batch started",
            ("kind",),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "duet_encode_inference_seconds",
            "Time of the forward passes a job was part of",
            ("kind",),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "duet_encode_queue_items",
            "Texts + images queued or being encoded",
            registry=self.registry,
        )
        self.rejected = Counter(
            "duet_encode_rejected",
            "Requests refused with 429: encode queue full",
            registry=self.registry,
        )
        self.index_vectors = Gauge(
            "duet_index_vectors", "Vectors in each loaded index", ("index",), registry=self.registry
        )
        self.ready = Gauge(
            "duet_ready", "1 once the model and indices are loaded", registry=self.registry
        )

    def observe_batch(self, kind: str, items: int, jobs: int) -> None:
        self.batch_items.labels(kind).observe(items)
        self.batch_jobs.labels(kind).observe(jobs)

    def set_queue_depth(self, items: int) -> None:
        self.queue_depth.set(items)

    def observe_job(self, kind: str, queue_s: float, inference_s: float) -> None:
        self.queue_seconds.labels(kind).observe(queue_s)
        self.inference_seconds.labels(kind).observe(inference_s)

    def set_index_sizes(self, counts: dict[str, int]) -> None:
        for name, count in counts.items():
            self.index_vectors.labels(name).set(count)


def _route_template(scope: Scope) -> str:
    """The matched route's path template; static files as one route; else "unmatched"."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return str(template)
    return "/static" if scope.get("path", "").startswith("/static/") else "unmatched"


class RequestMetricsMiddleware:
    """Counts and times each request by route template and status; one access-log line each.

    The route label is the matched path template (`/indices/{name}/reload`), never the raw
    path, so unknown URLs cannot create unbounded label values.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app fails before answering, the server answers 500
        request_timing = timing.start_request()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                total_s = time.perf_counter() - start
                headers = list(message.get("headers", []))
                message = {**message, "headers": headers + request_timing.headers(total_s)}
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            template = _route_template(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method, str(status)).observe(seconds)
            if self.log_requests:
                client = scope.get("client") or ("-", 0)
                access_log.info(
                    '%s "%s %s" %d %.1fms',
                    client[0],
                    method,
                    scope.get("path"),
                    status,
                    seconds * 1000,
                )
