"""The loaded service every request uses, its FastAPI dependencies, and query dispatch.

`Service` is what the background loader builds (model, batcher, indices, label sets, caches and
the image-decoding pool); `ServiceState` holds it or the reason loading failed. A search's query
(`QuerySource`) is a text, a preprocessed image or a vector, and `search_with` runs the search on
the right thread for each.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import numpy as np
import torch
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from serve import retrieval
from serve.batching import EncodeBatcher
from serve.decoding import DEFAULT_MAX_DECODE_PIXELS, DEFAULT_SMALL_IMAGE_PIXELS, DecodeQueue
from serve.encoder import Encoder
from serve.errors import ApiError
from serve.indexing.filters import Filter, FilterError
from serve.indexing.store import ServedIndex
from serve.labels import LabelSetEmbeddings, PromptCache
from serve.registry import IndexRegistry
from serve.settings import Settings

T = TypeVar("T")

# an absolute path in an error message: shown to clients by its last part only
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\":,/]+/)*([^\s'\":,/]+)")


@dataclass(frozen=True, slots=True)
class Service:
    """What the loader builds and every request uses: model, batcher, indices, label sets."""

    encoder: Encoder
    batcher: EncodeBatcher
    indices: IndexRegistry
    label_sets: dict[str, LabelSetEmbeddings]
    prompt_cache: PromptCache = field(default_factory=PromptCache)
    runtime: str = "torch"  # what runs the towers (serve.runtime)
    runtime_fallback: str | None = None  # why `auto` runs torch, not ONNX Runtime
    # decodes and resizes request images: its size bounds how many full-size images are alive
    # /metadata answers are built one at a time: each is up to megabytes of JSON made by Python
    # code, and several built at once in the threadpool would take the interpreter lock from
    # every other request's thread by turns (serve.routes.clip_retrieval.metadata)
    answer_builds: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    # index updates (SearchIndex.add / delete) enter the threadpool one at a time: an index
    # applies one at a time, and updates waiting on its lock would hold threadpool threads
    index_updates: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    decoder: DecodeQueue = field(
        default_factory=lambda: DecodeQueue(
            2,
            small_image_pixels=DEFAULT_SMALL_IMAGE_PIXELS,
            max_decode_pixels=DEFAULT_MAX_DECODE_PIXELS,
        )
    )

    def close(self) -> None:
        self.batcher.close()
        self.indices.close()
        self.decoder.close()


@dataclass(slots=True)
class ServiceState:
    """Set once by the background loader: `service` when loaded, or `error` saying why not."""

    service: Service | None = None
    error: str | None = None


def public_reason(exc: BaseException | str) -> str:
    """A load failure's reason for clients: absolute paths cut to their last part."""
    reason = exc if isinstance(exc, str) else str(exc) or type(exc).__name__
    return _ABSOLUTE_PATH.sub(r"…/\1", reason)


@dataclass(frozen=True, slots=True)
class QuerySource:
    """A search's query: a text or a preprocessed [3, H, W] image still to encode, or a [1, D]
    unit vector."""

    text: str | None = None
    image: torch.Tensor | None = None
    vector: np.ndarray | None = None


async def search_with(
    service: Service,
    source: QuerySource,
    find: Callable[[np.ndarray], T],
    *,
    in_threadpool: bool = False,
) -> T:
    """`find(query vector [1, D])` off the event loop.

    A text or image is searched on the batcher's thread right after its batch is encoded, so a
    request hands off to another thread once, not twice; a given vector in the threadpool. A
    search that may take long out of the service's hands (`in_threadpool`: Qdrant's, waiting on
    the network or in its embedded engine) runs in the threadpool always: the batcher's thread
    must not wait on it.
    """
    if in_threadpool and source.vector is None:
        if source.text is not None:
            vectors = await service.batcher.encode_texts([source.text])
        else:
            assert source.image is not None
            vectors = await service.batcher.encode_images([source.image])
        return await run_in_threadpool(find, vectors)
    if source.text is not None:
        return await service.batcher.encode_then("text", [source.text], find)
    if source.image is not None:
        return await service.batcher.encode_then("image", [source.image], find)
    assert source.vector is not None
    return await run_in_threadpool(find, source.vector)


def embedding_query(values: list[float], dim: int, where: str) -> np.ndarray:
    """A client's embedding as a [1, dim] query, or 422 saying what is wrong with it."""
    try:
        return retrieval.normalized_query(values, dim)
    except retrieval.QueryError as exc:
        raise ApiError(422, "validation_error", f"{where}: {exc}") from None


def filter_query(index: ServedIndex, raw: Any, settings: Settings, where: str) -> Filter | None:
    """A client's `filter` for `index`, or 422 naming the field or operator that is wrong.

    Parsed before anything is encoded: a filter is charged (its conditions and `in` values,
    each a pass over the rows) and checked against the index's fields first."""
    if raw is None:
        return None
    try:
        return index.filter(
            raw,
            max_conditions=settings.max_filter_conditions,
            max_values=settings.max_filter_values,
        )
    except FilterError as exc:
        raise ApiError(422, "validation_error", f"{where}: {exc}") from None


def service_of(request: Request) -> Service:
    """The loaded service, or 503 not_ready (with the load failure's reason if there was one)."""
    state: ServiceState = request.app.state.service
    if state.service is not None:
        return state.service
    if state.error is not None:
        raise ApiError(503, "not_ready", f"model or index failed to load: {state.error}")
    raise ApiError(503, "not_ready", "model and index are still loading")


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_service(request: Request) -> Service:
    return service_of(request)


async def get_settings(request: Request) -> Settings:
    return settings_of(request)


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
