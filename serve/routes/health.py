"""GET /health (liveness), GET /ready (model and indices loaded) and GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve.errors import error_responses
from serve.metrics import ServiceMetrics
from serve.schemas import HealthResponse, ReadyResponse
from serve.service import ServiceDep, ServiceState

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, summary="Liveness: is the process serving?")
async def health() -> HealthResponse:
    """200 whenever the server answers, also while loading or after loading failed (see /ready)."""
    return HealthResponse(status="ok")


@router.get(
    "/ready",
    response_model=ReadyResponse,
    summary="Readiness: are the model and every index loaded?",
    responses=error_responses(503),
)
async def ready(service: ServiceDep) -> ReadyResponse:
    """Async: it only reads the loaded state, so it answers even while the threadpool is busy."""
    counts = service.indices.counts()
    return ReadyResponse(
        status="ready",
        model=service.encoder.model_name,
        index_count=counts[service.indices.default_name],
        indices=counts,
        runtime=service.runtime,
        runtime_fallback=service.runtime_fallback,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests, latency, batch sizes, queue depth, index sizes",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **error_responses(401)},
)
async def metrics(request: Request) -> Response:
    registry: ServiceMetrics = request.app.state.metrics
    state: ServiceState = request.app.state.service
    registry.ready.set(state.service is not None)
    if state.service is not None:
        registry.set_index_sizes(state.service.indices.counts())
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
