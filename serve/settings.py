"""Service settings: one pydantic-settings class read from `DUET_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
)
# Per form field, besides its text: multipart boundary and part headers.
FORM_FIELD_OVERHEAD_BYTES = 256
UTF8_MAX_BYTES_PER_CHAR = 4


class Settings(BaseSettings):
    """Everything the service reads from the environment, e.g. `DUET_ARTIFACT_DIR=...`."""

    model_config = SettingsConfigDict(env_prefix="DUET_", extra="ignore")

    artifact_dir: Path = Field(description="Model artifact directory (written by training export).")
    index_dir: Path = Field(description="Index directory written by `python -m serve.build_index`.")
    host: str = Field(default="127.0.0.1", description="Interface `python -m serve` binds to.")
    port: int = Field(
        default=8000, ge=1, le=65535, description="TCP port `python -m serve` listens on."
    )
    device: str = Field(
        default="cpu", description="Torch device for the encoders, e.g. cpu or cuda:0."
    )
    default_k: int = Field(
        default=10, ge=1, description="Results per search when the request gives no k."
    )
    max_k: int = Field(default=100, ge=1, description="Largest k a search may ask for.")
    max_upload_bytes: int = Field(
        default=10 * MIB, ge=1, description="Largest image upload, in bytes."
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="Largest decoded image (width x height), checked before decoding.",
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
    default_templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        description='Prompt templates for /classify requests that give none; "{}" is the label.',
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Log level of the service and of uvicorn."
    )

    @field_validator("default_templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str]) -> list[str]:
        if not templates:
            raise ValueError("default_templates must not be empty")
        for template in templates:
            if "{}" not in template:
                raise ValueError(f'default template {template!r} has no "{{}}" for the label')
        return templates

    @model_validator(mode="after")
    def _default_k_within_max(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        return self

    @property
    def max_request_bytes(self) -> int:
        """Largest request body: one image upload plus the most form fields allowed beside it."""
        fields = self.max_labels + self.max_templates + 2  # + k and the image part's headers
        per_field = self.max_text_chars * UTF8_MAX_BYTES_PER_CHAR + FORM_FIELD_OVERHEAD_BYTES
        return self.max_upload_bytes + fields * per_field
