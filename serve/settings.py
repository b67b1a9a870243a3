"""Service settings: one pydantic-settings class read from `DUET_*` environment variables."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.preprocess import DEFAULT_MAX_RESIZED_PIXELS
from serve.decoding import DEFAULT_MAX_DECODE_PIXELS, DEFAULT_SMALL_IMAGE_PIXELS

MIB = 1024 * 1024
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
)
DEFAULT_INDEX_NAME = "default"
INDEX_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class LabelSet(BaseModel):
    """A named zero-shot classifier configured at start-up: labels and their prompt templates."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str] = Field(min_length=1, description="Class names, no duplicates.")
    templates: list[str] | None = Field(
        None, description='Prompt templates with "{}" for the label (default: default_templates).'
    )

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        labels = [label.strip() for label in labels]
        if any(not label for label in labels):
            raise ValueError("labels must not be empty strings")
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"duplicate labels: {', '.join(duplicates)}")
        return labels

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | None) -> list[str] | None:
        return None if templates is None else _check_templates(templates)


def _check_templates(templates: list[str]) -> list[str]:
    if not templates:
        raise ValueError("templates must not be empty")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f'template {template!r} has no "{{}}" for the label')
    return templates


def _json_or_file(value: Any, what: str) -> Any:
    """A JSON object given inline (starts with "{") or as the path of a JSON file."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return {}
    if not text.startswith("{"):
        path = Path(text)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not valid JSON: {exc}") from None


class ImageLimits(BaseSettings):
    """The per-image bounds: the service's, and index builds' too (one rule, one setting each);
    images are refused (served: 413) or skipped (built) over them, before they are decoded."""

    model_config = SettingsConfigDict(env_prefix="DUET_", extra="ignore")

    max_upload_bytes: int = Field(
        default=10 * MIB, ge=1, description="Largest image (upload, base64-decoded or fetched)."
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="Largest decoded image (width x height), checked before decoding.",
    )
    max_resized_pixels: int = Field(
        default=DEFAULT_MAX_RESIZED_PIXELS,
        ge=1,
        description="Largest image after the model's resize (a thin image grows along its long "
        "side), checked from the header before decoding.",
    )


class Settings(ImageLimits):
    """Everything the service reads from the environment, e.g. `DUET_ARTIFACT_DIR=...`."""

    model_config = SettingsConfigDict(env_prefix="DUET_", extra="ignore")

    artifact_dir: Path = Field(description="Model artifact directory (written by training export).")
    index_dir: Path | None = Field(
        None, description='Index directory (`python -m serve.build_index`), served as "default".'
    )
    indices: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict,
        description='More named indices: JSON {"name": "/path/to/index", ...} or a JSON file path.',
    )
    host: str = Field(default="127.0.0.1", description="Interface `python -m serve` binds to.")
    port: int = Field(
        default=8000, ge=1, le=65535, description="TCP port `python -m serve` listens on."
    )
    device: str = Field(
        default="cpu", description="Torch device for the encoders, e.g. cpu or cuda:0."
    )
    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        default="auto",
        description="What runs the towers. auto: ONNX Runtime fp32 on the CPU (exported into "
        "the artifact at the first start and checked against torch at every start), else torch "
        "with the reason in /ready. torch, onnx, onnx-int8: that one, or not ready saying why "
        "(`python -m common.onnx_towers ARTIFACT [--int8]` makes the ONNX towers); onnx gives "
        "torch's embeddings within 1e-4, onnx-int8 approximates them (cosine >= 0.99).",
    )
    encode_threads: int = Field(
        default=0,
        ge=0,
        description="Threads per forward pass (torch's, ONNX Runtime's); 0: the CPUs this "
        "process may use (its affinity mask, capped by its cgroup's CPU quota).",
    )
    onnx_spinning: bool = Field(
        default=False,
        description="Let ONNX Runtime's threads busy-wait for work between and within forward "
        "passes. Off: a waiting thread sleeps, so its core goes to FAISS, the HTTP threads and "
        "other processes on the host; on can gain a little on an idle machine.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="If set, every request except /health, /ready, the page and the docs must "
        "send it (X-API-Key or Authorization: Bearer), as its UTF-8 bytes.",
    )
    thumbnail_url_ttl_s: int = Field(
        default=3600,
        ge=60,
        le=30 * 24 * 3600,
        description="With an API key, a signed thumbnail URL from a search opens the thumbnail "
        "for at least this long and at most twice it (expiries are rounded up to a multiple of "
        "it, so repeated searches hand out the same URL and the browser's cache serves it).",
    )
    # --- search and classify ---
    default_k: int = Field(
        default=10, ge=1, description="Results per search when the request gives no k."
    )
    max_k: int = Field(default=100, ge=1, description="Largest k a search may ask for.")
    dedup_overfetch: int = Field(
        default=4,
        ge=1,
        description="With near-duplicate removal, a search looks at k x this many candidates.",
    )
    label_sets: Annotated[dict[str, LabelSet], NoDecode] = Field(
        default_factory=dict,
        description='Named label sets for /classify: JSON {"name": {"labels": [...], '
        '"templates": [...]}} or a JSON file path; embedded once at start-up.',
    )
    default_templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        description='Prompt templates for /classify requests that give none; "{}" is the label.',
    )
    # --- request limits ---
    max_request_bytes: int = Field(
        default=32 * MIB,
        ge=1,
        description="Largest request body: all uploads (base64 included) and fields together.",
    )
    max_request_pixels: int = Field(
        default=200_000_000,
        ge=1,
        description="Most decoded pixels of all the images of one request together.",
    )
    decode_threads: int = Field(
        default=2,
        ge=1,
        description="Images decoded at once (all requests): bounds the full-size images in memory; "
        "one more thread decodes only small images.",
    )
    small_image_pixels: int = Field(
        default=DEFAULT_SMALL_IMAGE_PIXELS,
        ge=1,
        description="Images up to this many decoded pixels are small: they have a decode thread "
        "of their own and never wait behind larger ones.",
    )
    max_decode_pixels: int = Field(
        default=DEFAULT_MAX_DECODE_PIXELS,
        ge=1,
        description="Most decoded pixels of small, and apart of large, images waiting for or in "
        "decoding (all requests); beyond it requests get 429. Bounds how long an image waits.",
    )
    max_text_chars: int = Field(
        default=1000, ge=1, description="Longest query text, label or template."
    )
    max_labels: int = Field(
        default=256, ge=1, description="Most labels one /classify request may give."
    )
    max_templates: int = Field(
        default=32, ge=1, description="Most prompt templates one /classify may give."
    )
    max_classify_prompts: int = Field(
        default=2048,
        ge=1,
        description="Most labels x templates one /classify may ask to encode.",
    )
    prompt_cache_entries: int = Field(
        default=16384,
        ge=0,
        description="Prompt embeddings kept for /classify (LRU over (model, label in template)).",
    )
    max_items_per_request: int = Field(
        default=32,
        ge=1,
        description="Most texts + images one /embed or /classify may send, and most images "
        "one POST /indices/{name}/items may add.",
    )
    max_update_items: int = Field(
        default=256,
        ge=1,
        description="Most items one POST /indices/{name}/items may add (images and embeddings "
        "together), and most ids one POST /indices/{name}/items/delete may name; over it, 413.",
    )
    max_item_metadata_bytes: int = Field(
        default=16 * 1024,
        ge=2,
        description="Largest `metadata` of one added item, as compact JSON (UTF-8 bytes).",
    )
    max_metadata_ids: int = Field(
        default=1000, ge=1, description="Most ids one POST /metadata may ask for."
    )
    max_filter_conditions: int = Field(
        default=16,
        ge=1,
        description="Most conditions in one search's `filter` (each is a pass over the rows).",
    )
    max_filter_values: int = Field(
        default=64,
        ge=1,
        description="Most values in one search's `filter` `in` lists together (each is a pass "
        "over the index's rows).",
    )
    max_response_bytes: int = Field(
        default=16 * MIB,
        ge=1024,
        description="Largest answer a request may build (POST /metadata with thumbnails), "
        "charged as it is built: over it, 413.",
    )
    # --- dynamic batching ---
    batching: bool = Field(
        default=True,
        description="Encode concurrent requests together; false: one forward pass per request.",
    )
    max_batch_size: int = Field(
        default=32, ge=1, description="Most texts or images encoded in one forward pass."
    )
    max_wait_ms: float = Field(
        default=5.0, ge=0, description="How long a batch waits for more work after its first item."
    )
    max_queue_items: int = Field(
        default=512,
        ge=1,
        description="Most texts + images waiting to be encoded; beyond it requests get 429.",
    )
    retry_after_s: int = Field(
        default=1,
        ge=0,
        description="Retry-After of a 429 answer, and of a 503 unavailable (vector store).",
    )
    search_threads: int = Field(
        default=1,
        ge=1,
        description="OpenMP threads per FAISS search; concurrent requests bring the parallelism.",
    )
    # --- index updates ---
    index_writes: bool = Field(
        default=True,
        description="Take each index's write lock when it is free, so that items can be added "
        "and deleted (journalled); false: serve every index read-only (replicas).",
    )
    compact_journal_mib: int = Field(
        default=256,
        ge=1,
        description="Compact an index in the background once its journal of updates reaches "
        "this many MiB (a new snapshot; the journal starts empty).",
    )
    # --- the vector store (docs/operations.md, "More than one machine") ---
    vector_store: Literal["faiss", "qdrant"] = Field(
        default="faiss",
        description="Where the indices live: faiss (index directories, searched in this "
        "process) or qdrant (Qdrant collections written by `python -m "
        "serve.indexing.to_qdrant`, shared by any number of replicas).",
    )
    qdrant_url: str | None = Field(
        None, description="Qdrant server, e.g. http://qdrant:6333 (vector_store qdrant)."
    )
    qdrant_path: Path | None = Field(
        None, description="Embedded Qdrant store's directory, instead of a server (one process)."
    )
    qdrant_api_key: SecretStr | None = Field(None, description="The Qdrant server's API key.")
    qdrant_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Longest wait for one Qdrant call; past it the request answers 503.",
    )
    qdrant_collections: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description='The served collections: JSON {"name": "collection", ...} (the first is '
        'the default), or one collection name, served as "default".',
    )
    # --- image_url (clip-retrieval's /knn-service) ---
    image_url_fetch: bool = Field(
        default=False, description="Allow /knn-service to download image_url (public hosts only)."
    )
    image_url_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Time limit of one whole image_url download (name lookup, connect, headers, "
        "redirects, body), in s; at the limit the download is cancelled and its socket closed.",
    )
    image_url_allowed_networks: list[str] = Field(
        default_factory=list,
        description="Non-public networks image_url may fetch from besides public hosts, e.g. "
        '["10.20.0.0/16"] for an internal image store; none by default.',
    )
    # --- HTTP connections ---
    header_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="A request's headers must arrive within this time of its first byte (or of "
        "the connection), else the connection is closed with 408.",
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A request's body must arrive within this time of its headers, else 408 "
        "and the connection is closed.",
    )
    max_header_bytes: int = Field(
        default=32 * 1024, ge=1024, description="Largest request line + headers, in bytes (431)."
    )
    max_header_count: int = Field(default=100, ge=1, description="Most request headers (431).")
    send_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="An answer the client does not read (over 64 KiB left unsent) must drain "
        "within this time, else the connection is aborted and the answer's memory freed.",
    )
    shutdown_timeout_s: int = Field(
        default=5,
        ge=0,
        description="On SIGTERM, requests still running this long after it are cancelled and the "
        "server exits (`python -m serve`; the uvicorn command: UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN).",
    )
    # --- web and logs ---
    cors_origins: list[str] = Field(
        default_factory=list,
        description='Origins web pages may call the API from, e.g. ["https://rom1504.github.io"] '
        "for clip-retrieval's hosted front; none by default.",
    )
    access_log: bool = Field(default=True, description="One log line per request (serve.access).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Log level of the service and of uvicorn."
    )

    @field_validator("indices", mode="before")
    @classmethod
    def _indices_json(cls, value: Any) -> Any:
        return _json_or_file(value, "indices")

    @field_validator("qdrant_collections", mode="before")
    @classmethod
    def _collections_json(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() and not value.lstrip().startswith("{"):
            return {DEFAULT_INDEX_NAME: value.strip()}  # one collection
        return _json_or_file(value, "qdrant_collections")

    @field_validator("label_sets", mode="before")
    @classmethod
    def _label_sets_json(cls, value: Any) -> Any:
        return _json_or_file(value, "label_sets")

    @field_validator("indices", "label_sets", "qdrant_collections")
    @classmethod
    def _names_are_simple(cls, named: dict[str, Any]) -> dict[str, Any]:
        for name in named:
            if not INDEX_NAME_PATTERN.fullmatch(name):
                raise ValueError(
                    f"name {name!r}: use letters, digits, '_', '.', '-' (at most 64 characters)"
                )
        return named

    @field_validator("image_url_allowed_networks")
    @classmethod
    def _networks_parse(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"image_url_allowed_networks: {exc}") from None
        return networks

    @field_validator("default_templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str]) -> list[str]:
        return _check_templates(templates)

    @field_validator("api_key")
    @classmethod
    def _key_fits_a_header(cls, key: SecretStr | None) -> SecretStr | None:
        """A key a header can carry: compared as UTF-8 bytes, and a server strips a value's
        surrounding spaces, so a key with them (or control characters) could never match."""
        if key is None:
            return None
        value = key.get_secret_value()
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("api_key must be valid UTF-8") from None
        if not value or value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(
                "api_key must be non-empty, without control characters or surrounding spaces"
            )
        return key

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        if self.max_request_bytes < self.max_upload_bytes:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) must be at least "
                f"max_upload_bytes ({self.max_upload_bytes})"
            )
        if self.max_decode_pixels < self.max_request_pixels:
            raise ValueError(
                f"max_decode_pixels ({self.max_decode_pixels}) must be at least "
                f"max_request_pixels ({self.max_request_pixels})"
            )
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels}) must be at least "
                f"max_image_pixels ({self.max_image_pixels})"
            )
        if self.index_dir is not None and DEFAULT_INDEX_NAME in self.indices:
            raise ValueError(
                f'index_dir is served as "{DEFAULT_INDEX_NAME}"; indices names it again'
            )
        if self.vector_store == "qdrant":
            self._check_qdrant()
        elif self.index_dir is None and not self.indices:
            raise ValueError("no index: set index_dir (DUET_INDEX_DIR) or indices (DUET_INDICES)")
        if self.runtime in ("onnx", "onnx-int8") and self.device != "cpu":
            raise ValueError(f"runtime {self.runtime} runs on the CPU; device is {self.device}")
        return self

    def _check_qdrant(self) -> None:
        if (self.qdrant_url is None) == (self.qdrant_path is None):
            raise ValueError(
                "vector_store qdrant needs one of qdrant_url (DUET_QDRANT_URL, a server) or "
                "qdrant_path (DUET_QDRANT_PATH, an embedded store)"
            )
        if not self.qdrant_collections:
            raise ValueError(
                "vector_store qdrant serves qdrant_collections (DUET_QDRANT_COLLECTIONS)"
            )
        if self.index_dir is not None or self.indices:
            raise ValueError(
                "vector_store qdrant serves qdrant_collections; index_dir and indices are for "
                "faiss (write an index into Qdrant with `python -m serve.indexing.to_qdrant`)"
            )

    @property
    def index_sources(self) -> dict[str, Path | str]:
        """Every index by name, the default first: its directory (faiss) or collection (qdrant)."""
        if self.vector_store == "qdrant":
            return dict(self.qdrant_collections)
        return dict(self.index_paths)

    @property
    def index_paths(self) -> dict[str, Path]:
        """Every index by name, the default (the one used when a request names none) first."""
        first = {} if self.index_dir is None else {DEFAULT_INDEX_NAME: self.index_dir}
        return {**first, **self.indices}
