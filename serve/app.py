"""`create_app(settings)`: the FastAPI app; its lifespan loads the model artifact and the indices.

Loading runs in a background thread so that the server listens at once: /health answers 200
(the process is alive) and /ready 503 not_ready while it runs — and, with the reason, if it
fails — instead of the server not listening at all.

The API docs (/docs, /redoc) load Swagger UI and ReDoc from files installed with the service
(the `fastapi-offline` package's copies, served under /docs-assets), not from a CDN: they work
offline and leak no visit to a third party.

Middleware, outermost first: request metrics and access log (so they see every answer, 401s and
500s included), the cancelling of a request whose client disconnected (`serve.disconnect`, 499),
CORS (preflights answered before the key check), the API key, HEAD run as GET (`serve.head`),
and the catch-all that turns an unexpected exception into a 500 envelope.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from serve import timing
from serve.auth import ApiKeyMiddleware
from serve.batching import EncodeBatcher
from serve.decoding import DecodeQueue
from serve.disconnect import CancelOnDisconnect
from serve.errors import install_error_handlers
from serve.head import HeadAsGet
from serve.images import lower_decode_priority, return_large_frees_to_os
from serve.indexing.index import IndexLoadError, SearchIndex
from serve.labels import PromptCache, embed_label_sets
from serve.metrics import RequestMetricsMiddleware, ServiceMetrics
from serve.registry import IndexLoader, IndexRegistry
from serve.routes import (
    classify,
    clip_retrieval,
    embed,
    health,
    indices,
    items,
    openai_api,
    page,
    search,
    thumbnails,
)
from serve.runtime import load_encoder
from serve.service import Service, ServiceState, public_reason
from serve.settings import Settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"  # Swagger UI and ReDoc files
EXPOSED_HEADERS = [
    "Retry-After",
    clip_retrieval.IGNORED_HEADER,
    clip_retrieval.CLAMPED_HEADER,
    *timing.HEADERS,
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service app; nothing is loaded until the server starts it (lifespan)."""
    settings = settings or Settings()  # type: ignore[call-arg]  # paths come from DUET_* env
    _configure_logging(settings)
    app = FastAPI(
        title="Duet retrieval",
        version="0.1.0",
        description="Image–text retrieval and zero-shot classification with a Duet model.",
        lifespan=_lifespan,
        docs_url=None,  # served by _add_docs from local files
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.service = ServiceState()
    app.state.metrics = ServiceMetrics()
    install_error_handlers(app)
    app.add_middleware(HeadAsGet)  # inside the key check and the metrics: they see the HEAD
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization"],
            expose_headers=EXPOSED_HEADERS,
        )
    app.add_middleware(CancelOnDisconnect)  # inside the metrics: they see its 499
    app.add_middleware(
        RequestMetricsMiddleware, metrics=app.state.metrics, log_requests=settings.access_log
    )
    routes = (
        search,
        thumbnails,
        classify,
        embed,
        openai_api,
        indices,
        items,
        clip_retrieval,
        health,
    )
    for module in (*routes, page):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_docs(app)
    return app


def _add_docs(app: FastAPI) -> None:
    """/docs and /redoc with their JavaScript and CSS served from /docs-assets (FastAPI's
    self-hosting recipe)."""
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    title = f"{app.title} - API docs"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=title,
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=title,
            redoc_js_url="/docs-assets/redoc.standalone.js",
            redoc_favicon_url="/docs-assets/favicon.png",
            with_google_fonts=False,
        )


def _configure_logging(settings: Settings) -> None:
    """Under `uvicorn --factory` nobody configures the root logger: give ours a handler."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    if not return_large_frees_to_os():
        log.info("not glibc: memory of large decoded images may stay with the process")
    loader = threading.Thread(
        target=load_service,
        args=(app.state.settings, state, app.state.metrics),
        name="duet-loader",
        daemon=True,
    )
    loader.start()
    yield
    if state.service is not None:
        state.service.close()


def load_service(settings: Settings, state: ServiceState, metrics: ServiceMetrics) -> None:
    """Load artifact, indices and label sets into `state.service`, or record why not."""
    registry = None
    try:
        encoder, runtime = load_encoder(settings)
        load_index = functools.partial(
            _load_index,
            expected_dim=encoder.embed_dim,
            model_name=encoder.model_name,
            threads=settings.search_threads,
            writable=None if settings.index_writes else False,
            compact_journal_bytes=settings.compact_journal_mib << 20,
        )
        registry = IndexRegistry(
            settings.index_sources, store_loader(settings, encoder.embed_dim, load_index)
        )
        label_sets = embed_label_sets(encoder, settings.label_sets, settings.default_templates)
    except Exception as exc:  # any failure: the service stays up, not ready, saying why
        if registry is not None:
            registry.close()
        state.error = public_reason(exc)  # clients see no absolute paths; the log has them
        log.error("loading failed, /ready will answer 503: %s", exc, exc_info=True)
        return
    batcher = EncodeBatcher(
        encoder,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue_items=settings.max_queue_items,
        batching=settings.batching,
        observer=metrics,
    )
    state.service = Service(
        encoder,
        batcher,
        registry,
        label_sets,
        prompt_cache=PromptCache(settings.prompt_cache_entries),
        runtime=runtime.name,
        # like a load failure's reason: clients see no absolute paths
        runtime_fallback=runtime.fallback_reason and public_reason(runtime.fallback_reason),
        decoder=DecodeQueue(
            settings.decode_threads,
            small_image_pixels=settings.small_image_pixels,
            max_decode_pixels=settings.max_decode_pixels,
            thread_setup=lower_decode_priority,
        ),
    )
    metrics.set_index_sizes(registry.counts())
    metrics.ready.set(1)
    log.info(
        "ready: model %s on %s, indices %s, label sets %s, batching %s",
        encoder.model_name,
        runtime.name,
        registry.counts(),
        list(label_sets) or "none",
        "on" if settings.batching else "off",
    )


def store_loader(settings: Settings, expected_dim: int, faiss_loader: IndexLoader) -> IndexLoader:
    """`faiss_loader` (index directories), or with `DUET_VECTOR_STORE=qdrant` the loader of
    Qdrant collections."""
    if settings.vector_store != "qdrant":
        return faiss_loader
    # imported here: a FAISS service never loads the Qdrant client
    from serve.indexing.qdrant_collection import QdrantConfig
    from serve.indexing.qdrant_store import qdrant_loader

    api_key = settings.qdrant_api_key
    config = QdrantConfig(
        url=settings.qdrant_url,
        path=settings.qdrant_path,
        api_key=api_key.get_secret_value() if api_key is not None else None,
        timeout_s=settings.qdrant_timeout_s,
    )
    writable = None if settings.index_writes else False
    return qdrant_loader(config, expected_dim=expected_dim, writable=writable)


def _load_index(
    path: Path | str,
    *,
    expected_dim: int,
    model_name: str,
    threads: int,
    writable: bool | None,
    compact_journal_bytes: int,
) -> SearchIndex:
    """`SearchIndex.load`, where any failure (a manifest of the wrong shape as much as a missing
    file) is an `IndexLoadError`: a reload answers 409 and the loaded version keeps serving."""
    # Searches run on the batcher's thread and in the threadpool, concurrently; one query
    # parallelised by OpenMP over every core on top of that oversubscribes the CPU (and OpenMP
    # teams spin-wait against torch's).
    try:
        index = SearchIndex.load(
            path,
            expected_dim=expected_dim,
            threads=threads,
            writable=writable,
            compact_journal_bytes=compact_journal_bytes,
        )
    except (IndexLoadError, OSError):
        raise
    except Exception as exc:  # e.g. {"search_params": [1]}: a ValueError deep in the loader
        raise IndexLoadError(f"{path} is not a usable index: {exc!r}") from exc
    try:
        built_by = index.describe()["model"]  # what GET /indices will show must be readable
    except Exception as exc:  # e.g. {"model": [1]}
        index.close()
        raise IndexLoadError(f"{path} has a manifest of the wrong shape: {exc!r}") from exc
    if built_by != model_name:
        log.warning(
            "index %s was built by model %r but the service runs %r: same dimension, "
            "but scores are only meaningful for the model that built the index",
            index.directory,
            built_by,
            model_name,
        )
    return index
