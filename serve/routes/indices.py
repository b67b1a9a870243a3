"""GET /indices (what each named index holds), POST /indices/{name}/reload (swap from disk) and
POST /indices/{name}/compact (fold the journal of updates into a new snapshot)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from serve.errors import ApiError, error_responses
from serve.indexing.index import IndexLoadError
from serve.schemas import IndexInfo, IndicesResponse
from serve.service import ServiceDep, SettingsDep

router = APIRouter(tags=["indices"])


@router.get(
    "/indices",
    response_model=IndicesResponse,
    summary="The named indices: size, dimension, type, the model that built them",
    responses=error_responses(401, 503),
)
def indices(service: ServiceDep, settings: SettingsDep) -> IndicesResponse:
    """Plain `def`: describing an index may read its files. With the search limits, so that a
    client (the web page) can bound its `k`."""
    return IndicesResponse(
        indices=[IndexInfo(**info) for info in service.indices.describe().values()],
        default_k=settings.default_k,
        max_k=settings.max_k,
    )


@router.post(
    "/indices/{name}/reload",
    response_model=IndexInfo,
    summary="Load index `name` from its directory again and swap it in atomically",
    responses=error_responses(401, 404, 409, 503),
)
async def reload_index(name: str, service: ServiceDep) -> IndexInfo:
    """Requests in flight finish on the old version; it is closed after the last of them.

    If the directory no longer holds a usable index (409), the loaded version keeps serving.
    """
    service.indices.resolve(name)  # 404 before any work
    try:
        info: dict[str, Any] = await run_in_threadpool(service.indices.reload, name)
    except (IndexLoadError, OSError) as exc:
        raise ApiError(
            409, "reload_failed", f"index {name!r} was not reloaded, the loaded one stays: {exc}"
        ) from exc
    return IndexInfo(name=name, default=name == service.indices.default_name, **info)


@router.post(
    "/indices/{name}/compact",
    response_model=IndexInfo,
    summary="Write a new snapshot of index `name` with every update applied; empty its journal",
    responses=error_responses(401, 404, 409, 503, 507),
)
async def compact_index(name: str, service: ServiceDep) -> IndexInfo:
    """Searches and updates go on while the snapshot is written (docs/operations.md,
    "Updating an index"). 409 on a read-only index; 507 when the disk has no room for it."""
    service.indices.resolve(name)
    with service.indices.lease(name) as index:
        try:
            info: dict[str, Any] = await run_in_threadpool(index.compact)
        except OSError as exc:  # IndexReadOnlyError: 409 read_only (serve/errors.py)
            raise ApiError(
                507,
                "insufficient_storage",
                f"index {name!r} was not compacted ({exc.strerror or exc}); its journal keeps "
                "every update",
            ) from exc
    return IndexInfo(name=name, default=name == service.indices.default_name, **info)
