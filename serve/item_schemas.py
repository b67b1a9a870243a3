"""HTTP bodies of the index-item routes (add, get, delete items of a named index), with examples.

Apart from serve/schemas.py (the search, classify and embed bodies) along the routes' seam: these
change an index, those read it. The same validation context applies: with the settings passed
as `context={"settings": s}`, texts are bounded by max_text_chars, images per add by
max_items_per_request and each item's metadata by max_item_metadata_bytes.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from serve.schemas import (
    EXAMPLE_IMAGE_BASE64,
    StrictFloat,
    StrictId,
    check_items,
    check_length,
    settings_in,
)

ITEM_SOURCES = ("image", "image_url", "embedding")
EXAMPLE_THUMBNAIL_URL = "/thumbnails/default/24?v=3f2a9c0d51e8b7a4"


def metadata_bytes(metadata: dict[str, Any]) -> int:
    """The size a metadata object is charged: its compact JSON's UTF-8 bytes. ValueError for
    NaN or infinity (read from a body, they would be answered as JSON no client can parse)."""
    try:
        text = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise ValueError("metadata numbers must be finite (no NaN or Infinity)") from None
    return len(text.encode())


class ItemFields(BaseModel):
    """What is stored beside an added item's vector."""

    caption: str = Field("", description="The item's caption, shown with its results.")
    key: str = Field("", description="Your own key for the item (e.g. a file name); not unique.")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="A JSON object stored with the item and returned with its results; at most "
        "DUET_MAX_ITEM_METADATA_BYTES as compact JSON.",
    )

    @field_validator("caption", "key")
    @classmethod
    def _text_length(cls, text: str, info: ValidationInfo) -> str:
        return check_length(text, str(info.field_name), info)

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, metadata: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        settings = settings_in(info)
        size = metadata_bytes(metadata)
        if settings is not None and size > settings.max_item_metadata_bytes:
            raise ValueError(
                f"metadata is {size} bytes as JSON; the limit is "
                f"{settings.max_item_metadata_bytes} (max_item_metadata_bytes)"
            )
        return metadata


class NewItem(ItemFields):
    """One item to add: exactly one of `image`, `image_url`, `embedding`."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(
        None, description="The image: base64 of the file's bytes (a data: URL prefix is allowed)."
    )
    image_url: str | None = Field(
        None,
        description="Where to download the image (with DUET_IMAGE_URL_FETCH; public hosts only); "
        "stored as the item's url.",
    )
    embedding: list[StrictFloat] | None = Field(
        None,
        description="A precomputed vector of the index's dimension (normalised by the service); "
        "no thumbnail is made.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> NewItem:
        given = [name for name in ITEM_SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(ITEM_SOURCES)}; got {', '.join(given) or 'none'}"
            )
        return self


class AddItemsRequest(BaseModel):
    """JSON body of POST /indices/{name}/items."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "image": EXAMPLE_IMAGE_BASE64,
                            "caption": "a small red square",
                            "key": "red-square.png",
                            "metadata": {"album": "shapes", "year": 2025},
                        },
                        {"embedding": [0.5, 0.5, 0.5, 0.5], "caption": "from a vector"},
                    ]
                }
            ]
        },
    )

    items: list[NewItem] = Field(
        min_length=1,
        description="The items to add, in order (at most DUET_MAX_UPDATE_ITEMS; images and "
        "image_urls at most DUET_MAX_ITEMS_PER_REQUEST).",
    )

    @field_validator("items")
    @classmethod
    def _images_within_limit(cls, items: list[NewItem], info: ValidationInfo) -> list[NewItem]:
        check_items(sum(item.embedding is None for item in items), info)
        return items


class AddedItem(BaseModel):
    id: int = Field(description="The new item's id: stable, never reused.")
    key: str
    thumbnail_url: str | None = Field(
        None,
        description="Path of the item's thumbnail, as in search results; absent when the index "
        "has no thumbnails or the item was added by embedding.",
        exclude_if=lambda value: value is None,
    )


class AddItemsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "index": "default",
                    "ids": [24, 25],
                    "items": [
                        {"id": 24, "key": "red-square.png", "thumbnail_url": EXAMPLE_THUMBNAIL_URL},
                        {"id": 25, "key": ""},
                    ],
                    "took_ms": 31.5,
                }
            ]
        }
    )

    index: str = Field(description="The index the items were added to.")
    ids: list[int] = Field(description="The new ids, in the order the items were sent.")
    items: list[AddedItem] = Field(description="Per item, in order: id, key, thumbnail.")
    took_ms: float = Field(description="Time spent decoding, encoding and storing, in ms.")


class DeleteItemsRequest(BaseModel):
    """JSON body of POST /indices/{name}/items/delete."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"ids": [3, 24]}]})

    ids: list[StrictId] = Field(
        min_length=1, description="Ids to delete (at most DUET_MAX_UPDATE_ITEMS)."
    )


class DeleteItemsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"index": "default", "deleted": [3, 24], "not_found": []}]}
    )

    index: str
    deleted: list[int] = Field(description="Ids that were live and are now deleted.")
    not_found: list[int] = Field(description="Ids that are not (or no longer) in the index.")


class ItemResponse(BaseModel):
    """One stored item, as GET /indices/{name}/items/{id} shows it: not validated as an added
    item is (a built index's metadata is whatever its source held)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "index": "default",
                    "id": 24,
                    "key": "red-square.png",
                    "caption": "a small red square",
                    "url": None,
                    "metadata": {"album": "shapes", "year": 2025},
                    "thumbnail_url": EXAMPLE_THUMBNAIL_URL,
                }
            ]
        }
    )

    index: str
    id: int
    key: str
    caption: str
    metadata: dict[str, Any] = Field(description="The item's JSON metadata.")
    url: str | None = Field(None, description="The image's source URL, where known.")
    thumbnail_url: str | None = Field(
        None,
        description="Path of the item's thumbnail (signed under an API key, as in search "
        "results); absent when it has none.",
        exclude_if=lambda value: value is None,
    )
