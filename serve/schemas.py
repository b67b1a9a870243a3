"""HTTP request and response bodies (pydantic, with examples for the OpenAPI page).

Limits that come from the settings (max_k, max_text_chars, max_labels, max_templates) are checked
by the validators when the settings are passed as validation context: `context={"settings": s}`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from serve.settings import Settings


def _settings(info: ValidationInfo) -> Settings | None:
    return (info.context or {}).get("settings")


def _check_k(k: int | None, info: ValidationInfo) -> int | None:
    settings = _settings(info)
    if k is not None and settings is not None and k > settings.max_k:
        raise ValueError(f"k must be at most {settings.max_k} (max_k), got {k}")
    return k


def _check_length(text: str, what: str, info: ValidationInfo) -> str:
    settings = _settings(info)
    if settings is not None and len(text) > settings.max_text_chars:
        raise ValueError(
            f"{what} is {len(text)} characters; the limit is {settings.max_text_chars}"
        )
    return text


class ErrorResponse(BaseModel):
    """The one error envelope: every error the service returns has exactly these two keys."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error": "text must not be empty", "type": "validation_error"}]
        }
    )

    error: str = Field(description="What went wrong, for a person to read.")
    type: str = Field(description="Machine-readable kind, e.g. validation_error, not_ready.")


class SearchRequest(BaseModel):
    """Search by text (JSON body of POST /search)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"text": "red circle", "k": 5}]}
    )

    text: str = Field(description="Query text; surrounding whitespace is ignored.")
    k: int | None = Field(
        None, ge=1, description="Number of results (default: DUET_DEFAULT_K, at most DUET_MAX_K)."
    )

    @field_validator("text")
    @classmethod
    def _text_not_empty(cls, text: str, info: ValidationInfo) -> str:
        text = text.strip()
        if not text:
            raise ValueError("text must not be empty")
        return _check_length(text, "text", info)

    @field_validator("k")
    @classmethod
    def _k_within_max(cls, k: int | None, info: ValidationInfo) -> int | None:
        return _check_k(k, info)


class ImageSearchForm(BaseModel):
    """The form fields beside the `image` file of a multipart POST /search."""

    k: int | None = Field(None, ge=1)

    @field_validator("k")
    @classmethod
    def _k_within_max(cls, k: int | None, info: ValidationInfo) -> int | None:
        return _check_k(k, info)


class ClassifyForm(BaseModel):
    """The form fields beside the `image` file of POST /classify, after normalising."""

    labels: list[str] = Field(min_length=1)
    templates: list[str] = Field(min_length=1)

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, labels: Any) -> Any:
        """One comma-separated value means several labels; repeated fields are taken as they are."""
        if isinstance(labels, list) and len(labels) == 1 and isinstance(labels[0], str):
            labels = labels[0].split(",")
        if isinstance(labels, list):
            labels = [s.strip() if isinstance(s, str) else s for s in labels]
            labels = [s for s in labels if s != ""]
        if labels == []:
            raise ValueError("give at least one label (form field `labels`)")
        return labels

    @field_validator("labels")
    @classmethod
    def _labels_within_limits(cls, labels: list[str], info: ValidationInfo) -> list[str]:
        settings = _settings(info)
        if settings is not None and len(labels) > settings.max_labels:
            raise ValueError(f"{len(labels)} labels; the limit is {settings.max_labels}")
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"duplicate labels: {', '.join(duplicates)}")
        return [_check_length(label, "label", info) for label in labels]

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str], info: ValidationInfo) -> list[str]:
        settings = _settings(info)
        if settings is not None and len(templates) > settings.max_templates:
            raise ValueError(f"{len(templates)} templates; the limit is {settings.max_templates}")
        for template in templates:
            if "{}" not in template:
                raise ValueError(f'template {template!r} has no "{{}}" where the label goes')
            _check_length(template, "template", info)
        return templates


class SearchHit(BaseModel):
    id: int = Field(description="Row id in the index.")
    key: str = Field(description="Sample key from the shards.")
    score: float = Field(description="Cosine similarity to the query, in [-1, 1].")
    caption: str
    metadata: dict[str, Any] = Field(description="The sample's JSON metadata from the shards.")


class SearchResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {
                            "id": 17,
                            "key": "000000_0017",
                            "score": 0.31,
                            "caption": "a small red circle at the top left",
                            "metadata": {"shape": "circle", "color": "red"},
                        }
                    ],
                    "k": 5,
                    "took_ms": 4.2,
                }
            ]
        }
    )

    results: list[SearchHit] = Field(
        description="Best first; fewer than k if the index is smaller."
    )
    k: int = Field(description="The k that was used.")
    took_ms: float = Field(description="Time spent encoding and searching, in milliseconds.")


class Prediction(BaseModel):
    label: str
    probability: float = Field(ge=0.0, le=1.0)


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "predictions": [
                        {"label": "red circle", "probability": 0.91},
                        {"label": "blue square", "probability": 0.09},
                    ],
                    "templates": ["a photo of a {}."],
                }
            ]
        }
    )

    predictions: list[Prediction] = Field(description="One per label, most probable first.")
    templates: list[str] = Field(description="The prompt templates that were ensembled.")


class HealthResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"status": "ok", "model": "duet-micro", "index_count": 512}]
        }
    )

    status: str = Field(description='"ok" once the model and index are loaded.')
    model: str = Field(description="Name of the loaded model.")
    index_count: int = Field(description="Number of vectors in the loaded index.")
