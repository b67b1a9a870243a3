"""POST /classify: zero-shot probabilities of one or more images over labels or a named label set.

GET /label-sets lists the label sets configured at start-up (their embeddings are computed once,
at load). Labels sent with a request cost labels x templates prompts (`max_classify_prompts`);
each prompt is built only as far as the tokenizer reads (a template of many "{}" never expands
beyond that), embedded on first use and kept in an LRU cache (`prompt_cache_entries`), and the
prompts not yet cached are tokenized on the request's thread and encoded as bulk work
(`EncodeBatcher`) in chunks of a quarter of `max_batch_size`, one chunk at a time, so a large
label set takes its turns between other requests instead of holding the encoder. A client
that disconnects stops its remaining chunks (`serve.disconnect`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request

from serve.body import (
    decode_base64_off_loop,
    media_type,
    read_form,
    read_json,
    read_uploads,
    validate,
)
from serve.cost import charge_prompts
from serve.encoder import zero_shot_probabilities
from serve.errors import ApiError, error_responses
from serve.images import prepare_images
from serve.labels import ensemble, prompts
from serve.schemas import (
    EXAMPLE_IMAGE_BASE64,
    ClassifyForm,
    ClassifyLabels,
    ClassifyRequest,
    ClassifyResponse,
    ImagePredictions,
    LabelSetInfo,
    Prediction,
)
from serve.service import Service, ServiceDep, SettingsDep
from serve.settings import Settings

router = APIRouter(tags=["classify"])

REQUEST_BODY_DOC = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "the image(s): repeat the field for several",
                    },
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
                    "label_set": {
                        "type": "string",
                        "description": "a configured label set instead of labels",
                    },
                },
            },
            "encoding": {"labels": {"style": "form", "explode": True}},
        },
        "application/json": {
            "schema": ClassifyRequest.model_json_schema(),
            "example": {"images": [EXAMPLE_IMAGE_BASE64], "labels": ["red circle", "blue square"]},
        },
    },
}


@dataclass(frozen=True, slots=True)
class ClassifyQuery:
    images: list[bytes]
    labels: ClassifyLabels


async def classify_query(request: Request, settings: SettingsDep) -> ClassifyQuery:
    """Read a multipart or JSON body; async because it only awaits the bytes."""
    kind = media_type(request)
    if kind == "application/json":
        parsed = await read_json(request, ClassifyRequest, settings)
        images = [
            await decode_base64_off_loop(data, f"body.images.{i}", settings)
            for i, data in enumerate(parsed.images)
        ]
        return ClassifyQuery(images, parsed)
    if kind != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            'send multipart/form-data with "image" file(s) and "labels" fields, or JSON',
        )
    form = await read_form(request, settings, max_files=settings.max_items_per_request)
    try:
        images = await read_uploads(form, "image", settings)
        fields = {
            "labels": form.getlist("labels") or None,
            "templates": form.getlist("templates") or None,
            "label_set": form.get("label_set") or None,
        }
        labels = validate(ClassifyForm, fields, settings)
    finally:
        await form.close()
    return ClassifyQuery(images, labels)


ClassifyQueryDep = Annotated[ClassifyQuery, Depends(classify_query)]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Zero-shot classification of images over labels or a named label set",
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 503),
    openapi_extra={"requestBody": REQUEST_BODY_DOC},
)
async def classify(
    service: ServiceDep, query: ClassifyQueryDep, settings: SettingsDep
) -> ClassifyResponse:
    """Multipart: `image` file(s), `labels` (repeated or comma-separated) or `label_set`,
    optional `templates`; or JSON with base64 `images`."""
    labels, templates, label_features = await label_embeddings(service, query.labels, settings)
    pixels = await prepare_images(query.images, service, settings)
    image_features = await service.batcher.encode_images(pixels)  # [N, D]
    probabilities = zero_shot_probabilities(
        image_features, label_features, service.encoder.logit_scale
    )  # [N, L]
    results = [ImagePredictions(predictions=ranked(labels, row)) for row in probabilities]
    return ClassifyResponse(
        predictions=results[0].predictions,
        results=results,
        templates=templates,
        label_set=query.labels.label_set,
    )


async def label_embeddings(
    service: Service, request: ClassifyLabels, settings: Settings
) -> tuple[list[str], list[str], np.ndarray]:
    """Labels, templates and their [L, D] embeddings: a label set's, cached, or encoded now."""
    if request.label_set is not None:
        found = service.label_sets.get(request.label_set)
        if found is None:
            known = ", ".join(service.label_sets) or "none are configured"
            raise ApiError(404, "not_found", f"no label set named {request.label_set!r} ({known})")
        return found.labels, found.templates, found.embeddings
    assert request.labels is not None
    labels, templates = request.labels, request.templates or settings.default_templates
    charge_prompts(len(labels), len(templates), settings)
    texts = prompts(labels, templates, service.encoder.max_text_chars)
    vectors = await prompt_embeddings(service, texts)  # [L * T, D]
    return labels, templates, ensemble(vectors, len(labels))


async def prompt_embeddings(service: Service, texts: list[str]) -> np.ndarray:
    """[N, D] embeddings of `texts`: cached ones as they are, the others encoded in chunks."""
    model = service.encoder.model_name
    found = service.prompt_cache.get_many(model, texts)
    missing = sorted({text for text, vector in zip(texts, found, strict=True) if vector is None})
    encoded: dict[str, np.ndarray] = {}
    chunk = max(1, service.batcher.max_batch_size // 4)  # a few ms of encoding at a time
    for start in range(0, len(missing), chunk):
        part = missing[start : start + chunk]
        vectors = await service.batcher.encode_texts(part, bulk=True)  # [<= chunk, D]
        service.prompt_cache.put_many(model, part, vectors)
        encoded.update(zip(part, vectors, strict=True))
    return np.stack(
        [
            vector if vector is not None else encoded[text]
            for text, vector in zip(texts, found, strict=True)
        ]
    )


def ranked(labels: list[str], probabilities: np.ndarray) -> list[Prediction]:
    predictions = [
        Prediction(label=label, probability=float(p))
        for label, p in zip(labels, probabilities, strict=True)
    ]
    predictions.sort(key=lambda prediction: prediction.probability, reverse=True)
    return predictions


@router.get(
    "/label-sets",
    response_model=list[LabelSetInfo],
    summary="The label sets configured at start-up (DUET_LABEL_SETS)",
    responses=error_responses(401, 503),
)
async def label_sets(service: ServiceDep) -> list[LabelSetInfo]:
    return [
        LabelSetInfo(name=s.name, labels=s.labels, templates=s.templates)
        for s in service.label_sets.values()
    ]
