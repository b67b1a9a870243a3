"""POST /classify: probabilities of an uploaded image over given labels, by prompt ensembling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from serve.errors import ApiError, error_responses
from serve.routes import (
    ServiceDep,
    SettingsDep,
    decode_image,
    media_type,
    read_form,
    read_upload,
    validate,
)
from serve.schemas import ClassifyForm, ClassifyResponse, Prediction

router = APIRouter(tags=["classify"])

REQUEST_BODY_DOC = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image", "labels"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "the image"},
                    "labels": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "candidate labels: repeat the field, or one "
                        "comma-separated value",
                    },
                    "templates": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": 'prompt templates, each with "{}" for the label '
                        "(default: DUET_DEFAULT_TEMPLATES)",
                    },
                },
            },
            "encoding": {"labels": {"style": "form", "explode": True}},
        }
    },
}


@dataclass(frozen=True, slots=True)
class ClassifyQuery:
    image: bytes
    labels: list[str]
    templates: list[str]


async def classify_query(request: Request, settings: SettingsDep) -> ClassifyQuery:
    """Read the multipart body; async because it only awaits the bytes."""
    if media_type(request) != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            'send multipart/form-data with an "image" file and "labels" fields',
        )
    form = await read_form(request, settings)
    try:
        image = await read_upload(form, "image", settings)
        templates = form.getlist("templates") or settings.default_templates
        fields = validate(
            ClassifyForm, {"labels": form.getlist("labels"), "templates": templates}, settings
        )
    finally:
        await form.close()
    return ClassifyQuery(image, fields.labels, fields.templates)


ClassifyQueryDep = Annotated[ClassifyQuery, Depends(classify_query)]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Zero-shot classification of an image over the given labels",
    responses=error_responses(400, 413, 415, 422, 503),
    openapi_extra={"requestBody": REQUEST_BODY_DOC},
)
def classify(
    service: ServiceDep, query: ClassifyQueryDep, settings: SettingsDep
) -> ClassifyResponse:
    """Multipart: `image` file, `labels` (repeated or comma-separated), optional `templates`."""
    image = decode_image(query.image, settings)
    (probabilities,) = service.encoder.classify([image], query.labels, query.templates)  # [L]
    predictions = [
        Prediction(label=label, probability=float(p))
        for label, p in zip(query.labels, probabilities, strict=True)
    ]
    predictions.sort(key=lambda prediction: prediction.probability, reverse=True)
    return ClassifyResponse(predictions=predictions, templates=query.templates)
