"""POST /embed: texts and images (base64 in JSON, or multipart files) -> normalised embeddings."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from serve.body import (
    decode_base64_off_loop,
    media_type,
    read_form,
    read_json,
    read_uploads,
    validate,
)
from serve.errors import ApiError, error_responses
from serve.images import prepare_images
from serve.schemas import EmbedRequest, EmbedResponse
from serve.service import ServiceDep, SettingsDep

router = APIRouter(tags=["embed"])

REQUEST_BODY_DOC = {
    "required": True,
    "content": {
        "application/json": {
            "schema": EmbedRequest.model_json_schema(),
            "example": {"texts": ["a red circle"], "images": []},
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "images: repeat the field",
                    },
                    "texts": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "texts: repeat the field",
                    },
                },
            },
            "encoding": {"texts": {"style": "form", "explode": True}},
        },
    },
}


async def _read(request: Request, settings: SettingsDep) -> tuple[list[str], list[bytes]]:
    kind = media_type(request)
    if kind == "application/json":
        parsed = await read_json(request, EmbedRequest, settings)
        images = [
            await decode_base64_off_loop(data, f"body.images.{i}", settings)
            for i, data in enumerate(parsed.images)
        ]
        return parsed.texts, images
    if kind == "multipart/form-data":
        form = await read_form(request, settings, max_files=settings.max_items_per_request)
        try:
            files = await read_uploads(form, "image", settings, required=False)
            texts = [t for t in form.getlist("texts") if isinstance(t, str)]
        finally:
            await form.close()
        # Validated with placeholders for the files: the same limits as JSON, one place.
        validate(EmbedRequest, {"texts": texts, "images": ["-"] * len(files)}, settings)
        return [text.strip() for text in texts], files
    raise ApiError(
        415,
        "unsupported_media_type",
        'send application/json {"texts": [...], "images": [base64, ...]} or multipart/form-data',
    )


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Embed texts and images with the service's model",
    responses=error_responses(400, 401, 413, 415, 422, 429, 503),
    openapi_extra={"requestBody": REQUEST_BODY_DOC},
)
async def embed(request: Request, service: ServiceDep, settings: SettingsDep) -> EmbedResponse:
    """Unit vectors in the order sent; the same vectors the indices hold and /search uses."""
    texts, files = await _read(request, settings)
    images = await prepare_images(files, service, settings)
    text_vectors, image_vectors = await asyncio.gather(
        service.batcher.encode_texts(texts), service.batcher.encode_images(images)
    )
    return EmbedResponse(
        model=service.encoder.model_name,
        dim=service.encoder.embed_dim,
        text_embeddings=text_vectors.tolist(),
        image_embeddings=image_vectors.tolist(),
    )
