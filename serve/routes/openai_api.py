"""OpenAI-compatible embeddings: POST /v1/embeddings, GET /v1/models and /v1/models/{id}.

Clients written for OpenAI's embeddings API work with `base_url=http://HOST:PORT/v1`: its `openai`
Python package and LlamaIndex's OpenAIEmbedding as they are, LangChain's OpenAIEmbeddings with
`check_embedding_ctx_length=False` (by default it sends token ids of OpenAI's tokenizer, tiktoken,
which are refused: they are not this model's tokens). Texts are `input` as OpenAI defines it;
images follow infinity's convention: `modality: "image"` with base64 images or data URIs as the
inputs. The same limits and API key (`Authorization: Bearer` is what OpenAI's clients send) as
every other route, errors in OpenAI's envelope (`serve.errors`) so that its clients show the
reason; the vectors are those /embed returns.
"""

from __future__ import annotations

import base64
import os
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Request

from serve.body import decode_base64_off_loop, read_json
from serve.errors import ApiError, error_responses
from serve.images import prepare_images
from serve.schemas import (
    OpenAIEmbedding,
    OpenAIEmbeddingsRequest,
    OpenAIEmbeddingsResponse,
    OpenAIErrorResponse,
    OpenAIModel,
    OpenAIModelList,
    OpenAIUsage,
)
from serve.service import Service, ServiceDep, SettingsDep
from serve.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/embeddings",
    response_model=OpenAIEmbeddingsResponse,
    summary="OpenAI-compatible embeddings of texts or images",
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 503, model=OpenAIErrorResponse),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": OpenAIEmbeddingsRequest.model_json_schema()}
            },
        }
    },
)
async def embeddings(
    request: Request, service: ServiceDep, settings: SettingsDep
) -> OpenAIEmbeddingsResponse:
    """Unit vectors in input order: `float` lists, or `base64` of little-endian float32."""
    body = await read_json(request, OpenAIEmbeddingsRequest, settings)
    _check_model(body.model, service)
    if body.dimensions is not None and body.dimensions != service.encoder.embed_dim:
        raise ApiError(
            422,
            "validation_error",
            f"body.dimensions: this model's embeddings have {service.encoder.embed_dim} "
            "dimensions; shortened embeddings are not offered",
            param="dimensions",
        )
    if body.modality == "image":
        files = [
            await decode_base64_off_loop(d, f"body.input.{i}", settings)
            for i, d in enumerate(body.inputs)
        ]
        vectors = await service.batcher.encode_images(
            await prepare_images(files, service, settings)
        )
        tokens = 0
    else:
        ids = await service.batcher.tokenize(body.inputs)  # [N, C], once for both
        vectors = await service.batcher.encode_tokens(ids)
        tokens = int((ids != 0).sum())  # up to and with each one's end-of-text, or the context
    data = [
        OpenAIEmbedding(index=i, embedding=_encode(vector, body.encoding_format))
        for i, vector in enumerate(vectors)
    ]
    return OpenAIEmbeddingsResponse(
        data=data,
        model=service.encoder.model_name,
        usage=OpenAIUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


@router.get(
    "/models",
    response_model=OpenAIModelList,
    summary="The served model, as OpenAI's model list",
    responses=error_responses(401, 503, model=OpenAIErrorResponse),
)
async def models(service: ServiceDep, settings: SettingsDep) -> OpenAIModelList:
    return OpenAIModelList(data=[_served_model(service, settings)])


@router.get(
    "/models/{model_id}",
    response_model=OpenAIModel,
    summary="The served model, if `model_id` names it (OpenAI's models.retrieve)",
    responses=error_responses(401, 404, 503, model=OpenAIErrorResponse),
)
async def model(
    model_id: Annotated[str, Path(max_length=256)], service: ServiceDep, settings: SettingsDep
) -> OpenAIModel:
    _check_model(model_id, service)
    return _served_model(service, settings)


def _served_model(service: Service, settings: Settings) -> OpenAIModel:
    created = int(os.stat(settings.artifact_dir).st_mtime)
    return OpenAIModel(id=service.encoder.model_name, created=created)


def _check_model(name: str | None, service: Service) -> None:
    if name is not None and name != service.encoder.model_name:
        raise ApiError(
            404,
            "model_not_found",
            f"model {name!r} is not served here; this service serves "
            f"{service.encoder.model_name!r} (GET /v1/models)",
            param="model",
        )


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what OpenAI's clients decode: float32, little-endian
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
