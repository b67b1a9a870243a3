"""HTTP request and response bodies (pydantic, with examples for the OpenAPI page).

Limits that come from the settings (max_k, max_text_chars, max_labels, max_templates,
max_items_per_request) are checked by the validators when the settings are passed as validation
context: `context={"settings": s}`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from serve.settings import Settings

# an 8 x 8 red PNG: examples in the API docs that work when sent as they are
EXAMPLE_IMAGE_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM8ISfHgA0wYRUdtB"
    "IA0MoBFD5jqJkAAAAASUVORK5CYII="
)
INT64_MAX = 2**63 - 1  # ids are int64 in FAISS and SQLite
# JSON-only numbers: `true` is not 1, `5.0` is not an id, and an id fits in int64
StrictId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
StrictCount = Annotated[int, Field(strict=True, ge=0)]
StrictFloat = Annotated[float, Field(strict=True)]


def _not_bool(value: Any) -> Any:
    """For numbers that may also come from form fields (strings), so cannot be strict."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


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


def _check_items(count: int, info: ValidationInfo) -> None:
    settings = _settings(info)
    if settings is not None and count > settings.max_items_per_request:
        raise ValueError(
            f"{count} texts and images in one request; the limit is "
            f"{settings.max_items_per_request} (max_items_per_request)"
        )


# the same checks for the item bodies (serve/item_schemas.py)
settings_in, check_length, check_items = _settings, _check_length, _check_items


def _split_labels(labels: Any) -> Any:
    """One comma-separated value means several labels; repeated fields are taken as they are."""
    if isinstance(labels, list) and len(labels) == 1 and isinstance(labels[0], str):
        labels = labels[0].split(",")
    if isinstance(labels, list):
        labels = [s.strip() if isinstance(s, str) else s for s in labels]
        labels = [s for s in labels if s != ""]
    if labels == []:
        raise ValueError("give at least one label (field `labels`), or a `label_set`")
    return labels


def _check_labels(labels: list[str], info: ValidationInfo) -> list[str]:
    settings = _settings(info)
    if settings is not None and len(labels) > settings.max_labels:
        raise ValueError(f"{len(labels)} labels; the limit is {settings.max_labels}")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"duplicate labels: {', '.join(duplicates)}")
    return [_check_length(label, "label", info) for label in labels]


def _check_templates(templates: list[str], info: ValidationInfo) -> list[str]:
    settings = _settings(info)
    if settings is not None and len(templates) > settings.max_templates:
        raise ValueError(f"{len(templates)} templates; the limit is {settings.max_templates}")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f'template {template!r} has no "{{}}" where the label goes')
        _check_length(template, "template", info)
    return templates


class ErrorResponse(BaseModel):
    """The one error envelope: every error the service returns has exactly these two keys."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error": "text must not be empty", "type": "validation_error"}]
        }
    )

    error: str = Field(description="What went wrong, for a person to read.")
    type: str = Field(description="Machine-readable kind, e.g. validation_error, not_ready.")


class OpenAIError(BaseModel):
    message: str = Field(description="What went wrong, for a person to read.")
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx).")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str = Field(description="Machine-readable kind, as `type` in the other routes.")


class OpenAIErrorResponse(BaseModel):
    """The error envelope of the /v1 routes: OpenAI's, which its clients read."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "message": "model 'text-embedding-3-small' is not served here",
                        "type": "invalid_request_error",
                        "param": "model",
                        "code": "model_not_found",
                    }
                }
            ]
        }
    )

    error: OpenAIError


# --- /search -----------------------------------------------------------------------------------


class SearchOptions(BaseModel):
    """What every search takes besides its query: which index, how many, near-duplicates."""

    index: str | None = Field(None, description="Index name (GET /indices); default: the first.")
    k: int | None = Field(
        None, ge=1, description="Number of results (default: DUET_DEFAULT_K, at most DUET_MAX_K)."
    )
    dedup: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Drop results whose cosine similarity to a better result is at least this.",
    )

    @field_validator("k", "dedup", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        return _not_bool(value)

    @field_validator("k")
    @classmethod
    def _k_within_max(cls, k: int | None, info: ValidationInfo) -> int | None:
        return _check_k(k, info)


QUERY_FIELDS = ("text", "image", "embedding", "id")
FILTER_DESCRIPTION = (
    'Only results whose metadata match: {"field": value} (equality), {"field": {"in": [...]}}, '
    '{"field": {"gte": 1, "lt": 5}} (gt, gte, lt, lte); all combined with AND. GET /indices '
    "lists each index's filterable fields."
)


class SearchRequest(SearchOptions):
    """JSON body of POST /search: exactly one of `text`, `image`, `embedding`, `id`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "red circle", "k": 5},
                {"id": 17, "k": 5, "dedup": 0.95},
                {"text": "a star", "k": 5, "filter": {"color": {"in": ["red", "blue"]}}},
                {"image": EXAMPLE_IMAGE_BASE64, "index": "default"},
            ]
        },
    )

    text: str | None = Field(None, description="Query text; surrounding whitespace is ignored.")
    image: str | None = Field(
        None, description="Query image: base64 of the file's bytes (a data: URL prefix is allowed)."
    )
    embedding: list[StrictFloat] | None = Field(
        None, description="Query vector of the index's dimension; normalised by the service."
    )
    id: StrictId | None = Field(None, description='"More like this": the id of an indexed item.')
    filter: dict[str, Any] | None = Field(None, description=FILTER_DESCRIPTION)

    @field_validator("text")
    @classmethod
    def _text_not_empty(cls, text: str | None, info: ValidationInfo) -> str | None:
        if text is None:
            return None
        text = text.strip()
        if not text:
            raise ValueError("text must not be empty")
        return _check_length(text, "text", info)

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        given = [name for name in QUERY_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(QUERY_FIELDS)}; got {', '.join(given) or 'none'}"
            )
        return self


class ImageSearchForm(SearchOptions):
    """The form fields beside the `image` file of a multipart POST /search."""

    filter: str | None = Field(None, description="The `filter` object, as JSON text.")


class SearchHit(BaseModel):
    id: int = Field(description="Row id in the index.")
    key: str = Field(description="Sample key from the shards.")
    score: float = Field(description="Cosine similarity to the query, in [-1, 1].")
    caption: str
    url: str | None = Field(None, description="The sample's `url` from its metadata, if any.")
    metadata: dict[str, Any] = Field(description="The sample's JSON metadata from the shards.")
    thumbnail_url: str | None = Field(
        None,
        description="Path of the result's thumbnail (GET it from the service root); absent when "
        "the index has no thumbnails. Carries the index build (`v`) and, with an API key, an "
        "expiry (`exp`, Unix seconds) and a signature (`sig`) that let an <img> tag load it "
        "without the key until then.",
        exclude_if=lambda value: value is None,
    )


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
                            "url": None,
                            "metadata": {"shape": "circle", "color": "red"},
                            "thumbnail_url": "/thumbnails/default/17?v=3f2a9c0d51e8b7a4",
                        }
                    ],
                    "index": "default",
                    "k": 5,
                    "took_ms": 4.2,
                }
            ]
        }
    )

    results: list[SearchHit] = Field(
        description="Best first; fewer than k if the index is smaller or duplicates were dropped."
    )
    index: str = Field(description="The index that was searched.")
    k: int = Field(description="The k that was used.")
    took_ms: float = Field(description="Time spent encoding and searching, in milliseconds.")


# --- /classify ---------------------------------------------------------------------------------


class ClassifyLabels(BaseModel):
    """Labels (+ templates) given in the request, or the name of a configured label set."""

    labels: list[str] | None = Field(
        None, description="Candidate labels (in a form: repeated, or one comma-separated value)."
    )
    templates: list[str] | None = Field(
        None,
        description='Prompt templates with "{}" for the label (default: DUET_DEFAULT_TEMPLATES).',
    )
    label_set: str | None = Field(
        None, description="A label set configured at start-up (GET /label-sets), instead of labels."
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _split(cls, labels: Any) -> Any:
        return None if labels is None else _split_labels(labels)

    @field_validator("labels")
    @classmethod
    def _labels_within_limits(cls, labels: list[str] | None, info: ValidationInfo) -> Any:
        return None if labels is None else _check_labels(labels, info)

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | None, info: ValidationInfo) -> Any:
        return None if templates is None else _check_templates(templates, info)

    @model_validator(mode="after")
    def _labels_or_set(self) -> ClassifyLabels:
        if (self.labels is None) == (self.label_set is None):
            raise ValueError("give either labels (with optional templates) or a label_set")
        if self.label_set is not None and self.templates is not None:
            raise ValueError("a label_set brings its own templates; do not send templates")
        return self


class ClassifyForm(ClassifyLabels):
    """The form fields beside the `image` file(s) of a multipart POST /classify."""


class ClassifyRequest(ClassifyLabels):
    """JSON body of POST /classify: base64 images plus labels or a label set."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"images": [EXAMPLE_IMAGE_BASE64], "labels": ["red circle", "blue square"]},
            ]
        },
    )

    images: list[str] = Field(
        min_length=1, description="Images to classify: base64 of each file's bytes."
    )

    @field_validator("images")
    @classmethod
    def _images_within_limit(cls, images: list[str], info: ValidationInfo) -> list[str]:
        _check_items(len(images), info)
        return images


class Prediction(BaseModel):
    label: str
    probability: float = Field(ge=0.0, le=1.0)


class ImagePredictions(BaseModel):
    predictions: list[Prediction] = Field(description="One per label, most probable first.")


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "predictions": [
                        {"label": "red circle", "probability": 0.91},
                        {"label": "blue square", "probability": 0.09},
                    ],
                    "results": [
                        {
                            "predictions": [
                                {"label": "red circle", "probability": 0.91},
                                {"label": "blue square", "probability": 0.09},
                            ]
                        }
                    ],
                    "templates": ["a photo of a {}."],
                    "label_set": None,
                }
            ]
        }
    )

    predictions: list[Prediction] = Field(
        description="The first image's predictions, most probable first (= results[0])."
    )
    results: list[ImagePredictions] = Field(description="Per image, in the order sent.")
    templates: list[str] = Field(description="The prompt templates that were ensembled.")
    label_set: str | None = Field(None, description="The label set used, if one was named.")


class LabelSetInfo(BaseModel):
    name: str
    labels: list[str]
    templates: list[str]


# --- /embed ------------------------------------------------------------------------------------


class EmbedRequest(BaseModel):
    """JSON body of POST /embed: texts and/or base64 images."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"texts": ["a red circle", "a blue square"]}]},
    )

    texts: list[str] = Field(default_factory=list, description="Texts to embed.")
    images: list[str] = Field(default_factory=list, description="Images: base64 of the files.")

    @field_validator("texts")
    @classmethod
    def _texts_valid(cls, texts: list[str], info: ValidationInfo) -> list[str]:
        texts = [text.strip() for text in texts]
        if any(not text for text in texts):
            raise ValueError("texts must not be empty")
        return [_check_length(text, "text", info) for text in texts]

    @model_validator(mode="after")
    def _some_items(self, info: ValidationInfo) -> EmbedRequest:
        if not self.texts and not self.images:
            raise ValueError("give at least one of texts, images")
        _check_items(len(self.texts) + len(self.images), info)
        return self


class EmbedResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "duet-tiny",
                    "dim": 4,
                    "text_embeddings": [[0.5, 0.5, 0.5, 0.5]],
                    "image_embeddings": [],
                }
            ]
        }
    )

    model: str = Field(description="Name of the model that embedded them.")
    dim: int = Field(description="Embedding dimension.")
    text_embeddings: list[list[float]] = Field(description="Unit vectors, one per text, in order.")
    image_embeddings: list[list[float]] = Field(
        description="Unit vectors, one per image, in order."
    )


# --- health, readiness, indices ----------------------------------------------------------------


class HealthResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: str = Field(description='"ok": the process is serving (liveness only).')


class ReadyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ready",
                    "model": "duet-micro",
                    "index_count": 512,
                    "indices": {"default": 512},
                    "runtime": "onnx",
                    "runtime_fallback": None,
                }
            ]
        }
    )

    status: str = Field(description='"ready": the model and every index are loaded.')
    model: str = Field(description="Name of the loaded model.")
    index_count: int = Field(description="Number of vectors in the default index.")
    indices: dict[str, int] = Field(description="Vectors per index, by name.")
    runtime: str = Field(description="What runs the towers: torch, onnx or onnx-int8.")
    runtime_fallback: str | None = Field(
        None,
        description="With DUET_RUNTIME=auto: why the service runs torch and not ONNX Runtime "
        "(e.g. the towers could not be exported into a read-only artifact); null otherwise.",
    )


class IndexInfo(BaseModel):
    """One index as `SearchIndex.describe()` tells it, with its name."""

    model_config = ConfigDict(extra="allow")

    name: str
    default: bool = Field(description="Searched when a request names no index.")
    count: int
    dim: int
    filterable: dict[str, str] = Field(
        default_factory=dict,
        description='Fields a search `filter` can test, with their kind: "number" or "string".',
    )


class IndicesResponse(BaseModel):
    indices: list[IndexInfo] = Field(description="Every index, the default first.")
    default_k: int = Field(description="Results of a search that gives no `k` (DUET_DEFAULT_K).")
    max_k: int = Field(description="The largest `k` a search may ask for (DUET_MAX_K).")


# --- clip-retrieval's back end -----------------------------------------------------------------


class KnnRequest(BaseModel):
    """clip-retrieval's /knn-service body: exactly one of text, image (base64), image_url,
    embedding_input; unknown keys are ignored like its back end does."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"text": "red circle", "modality": "image", "num_images": 5},
                {"image": EXAMPLE_IMAGE_BASE64, "num_images": 3, "num_result_ids": 10},
            ]
        },
    )

    text: str | None = None
    image: str | None = None
    image_url: str | None = None
    embedding_input: list[StrictFloat] | None = None
    modality: str | None = "image"
    num_images: StrictCount | None = None
    num_result_ids: StrictCount | None = None
    indice_name: str | None = None
    deduplicate: bool | None = None
    use_safety_model: bool | None = None
    use_violence_detector: bool | None = None
    use_mclip: bool | None = None
    aesthetic_score: Any = None
    aesthetic_weight: Any = None
    filter: dict[str, Any] | None = Field(
        None, description="This service's own addition (as in POST /search): " + FILTER_DESCRIPTION
    )

    @field_validator("text")
    @classmethod
    def _text_length(cls, text: str | None, info: ValidationInfo) -> str | None:
        return None if text is None else _check_length(text, "text", info)

    @model_validator(mode="after")
    def _one_query(self) -> KnnRequest:
        given = [
            name
            for name in ("text", "image", "image_url", "embedding_input")
            if getattr(self, name) not in (None, "")
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of text, image, image_url, embedding_input; "
                f"got {', '.join(given) or 'none'}"
            )
        return self


class MetadataRequest(BaseModel):
    """clip-retrieval's /metadata body: the ids whose metadata to return."""

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"examples": [{"ids": [0, 1, 2], "indice_name": None}]}
    )

    ids: list[StrictId] = Field(description="Ids from /knn-service results.")
    indice_name: str | None = None

    @field_validator("ids")
    @classmethod
    def _ids_within_limit(cls, ids: list[int], info: ValidationInfo) -> list[int]:
        settings = _settings(info)
        if settings is not None and len(ids) > settings.max_metadata_ids:
            raise ValueError(f"{len(ids)} ids; the limit is {settings.max_metadata_ids}")
        return ids


# --- OpenAI-compatible embeddings (/v1/embeddings, /v1/models) ---------------------------------


TOKEN_IDS_REFUSED = (
    "token ids are not accepted: send the texts, which this service tokenizes with its own "
    "model's tokenizer (ids from another tokenizer, such as the tiktoken ids LangChain's "
    "OpenAIEmbeddings sends by default, would stand for other words). With LangChain: "
    "OpenAIEmbeddings(..., check_embedding_ctx_length=False)"
)


class OpenAIEmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; images by infinity's convention (`modality: "image"`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "duet-tiny", "input": ["a red circle", "a blue square"]},
                {
                    "model": "duet-tiny",
                    "input": f"data:image/png;base64,{EXAMPLE_IMAGE_BASE64}",
                    "modality": "image",
                },
            ]
        },
    )

    input: str | list[str] = Field(
        description="A text or a list of texts; with modality image, base64 images or data URIs. "
        "Token ids (lists of integers) are refused (422): this service tokenizes with its own "
        "model's tokenizer."
    )
    model: str | None = Field(None, description="The served model's name (GET /v1/models).")
    encoding_format: str = Field(
        "float", pattern="^(float|base64)$", description="float, or base64 of float32 bytes."
    )
    modality: str = Field("text", pattern="^(text|image)$", description="What `input` holds.")
    dimensions: int | None = Field(
        None, description="Must be the model's dimension if given (no truncation)."
    )
    user: str | None = Field(None, description="Accepted and ignored, as by OpenAI's own API.")

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_ids(cls, value: object) -> object:
        """Token ids are another tokenizer's (LangChain's default sends tiktoken's): refused with
        the way to send texts instead, not a bare "should be a valid string" per item."""
        first = value[0] if isinstance(value, list) and value else None
        if isinstance(first, int | list) and not isinstance(first, bool):
            raise ValueError(TOKEN_IDS_REFUSED)
        return value

    @field_validator("input")
    @classmethod
    def _inputs_valid(cls, value: str | list[str], info: ValidationInfo) -> list[str]:
        inputs = [value] if isinstance(value, str) else value
        if not inputs:
            raise ValueError("input must not be empty")
        if any(not item.strip() for item in inputs):
            raise ValueError("input must not contain empty strings")
        _check_items(len(inputs), info)
        return inputs

    @model_validator(mode="after")
    def _text_lengths(self, info: ValidationInfo) -> OpenAIEmbeddingsRequest:
        if self.modality == "text":
            for text in self.inputs:
                _check_length(text, "input text", info)
        return self

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class OpenAIEmbedding(BaseModel):
    object: str = "embedding"
    index: int
    embedding: list[float] | str = Field(description="A unit vector, or base64 float32 bytes.")


class OpenAIUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the texts (images count none).")
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: str = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(description="Unix time the artifact was written.")
    owned_by: str = "duet"


class OpenAIModelList(BaseModel):
    object: str = "list"
    data: list[OpenAIModel]
