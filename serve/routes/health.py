"""GET /health: 200 once the model and index are loaded, 503 not_ready (with the reason) before."""

from __future__ import annotations

from fastapi import APIRouter

from serve.errors import error_responses
from serve.routes import ServiceDep
from serve.schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Readiness: is the model and index loaded?",
    responses=error_responses(503),
)
async def health(service: ServiceDep) -> HealthResponse:
    """Async: it only reads the loaded state, so it answers even while the threadpool is busy."""
    return HealthResponse(
        status="ok", model=service.encoder.model_name, index_count=service.index.count
    )
