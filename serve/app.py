"""`create_app(settings)`: the FastAPI app; its lifespan loads the model artifact and the index.

Loading runs in a background thread so that /health can answer 503 not_ready while it runs (and
keeps answering 503 with the reason if it fails), instead of the server not listening at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.artifact import load_artifact
from serve.encoder import Encoder
from serve.errors import install_error_handlers
from serve.index import SearchIndex
from serve.routes import Service, ServiceState, classify, health, search
from serve.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service app; nothing is loaded until the server starts it (lifespan)."""
    settings = settings or Settings()  # type: ignore[call-arg]  # paths come from DUET_* env
    app = FastAPI(
        title="Duet retrieval",
        version="0.1.0",
        description="Image–text retrieval and zero-shot classification with a Duet model.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.service = ServiceState()
    install_error_handlers(app)
    for module in (search, classify, health):
        app.include_router(module.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    loader = threading.Thread(
        target=load_service, args=(app.state.settings, state), name="duet-loader", daemon=True
    )
    loader.start()
    yield
    if state.service is not None:
        state.service.index.close()


def load_service(settings: Settings, state: ServiceState) -> None:
    """Load artifact + index into `state.service`, or record why not in `state.error`."""
    try:
        loaded = load_artifact(settings.artifact_dir, device=settings.device)
        index = SearchIndex.load(settings.index_dir, expected_dim=loaded.model.embed_dim)
    except Exception as exc:  # any failure: the service stays up, not ready, saying why
        state.error = str(exc) or type(exc).__name__
        log.error("loading failed, /health will answer 503: %s", state.error, exc_info=True)
        return
    _warn_if_other_model(index, loaded.manifest.get("model_name"))
    state.service = Service(Encoder(loaded, settings.device), index)
    log.info("ready: model %s, index of %d vectors", loaded.model.name, index.count)


def _warn_if_other_model(index: SearchIndex, model_name: str | None) -> None:
    built_by = index.manifest.get("model", {}).get("name")
    if built_by != model_name:
        log.warning(
            "index %s was built by model %r but the service runs %r: same dimension, "
            "but scores are only meaningful for the model that built the index",
            index.directory,
            built_by,
            model_name,
        )
