"""Shard lists and raw samples in the webdataset/img2dataset layout (KEY.jpg + KEY.txt [+ .json]).

Shared by the trainer's pipeline and the index builder, so both read shards the same way and
skip the same bad samples for the same, counted, reasons.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt",)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
SKIP_REASONS = (
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_caption",
    "corrupt_image",
    "unreadable_shard_data",
)
"""Why a sample can be skipped; every skip is counted under exactly one of these."""


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is the counter key it is skipped under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class RawSample:
    """One sample as stored: image bytes undecoded, caption text, and the JSON fields if any."""

    key: str
    url: str
    image: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def expand_urls(spec: str) -> list[str]:
    """`a/{000..009}.tar::b/x.tar` -> the list of shard URLs; local files must exist."""
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if part:
            urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    missing = [u for u in urls if not u.startswith(REMOTE_PREFIXES) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards not found, e.g. {missing[0]!r} (from {spec!r})"
        )
    return urls


def to_raw_sample(sample: dict[str, Any]) -> RawSample:
    """A webdataset sample dict (extension -> bytes) -> RawSample, or SampleError naming why not."""
    key = str(sample.get("__key__", "?"))
    image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if image is None:
        raise SampleError("missing_image", f"sample {key}: no image ({'/'.join(IMAGE_EXTENSIONS)})")
    raw_caption = next((sample[e] for e in CAPTION_EXTENSIONS if e in sample), None)
    if raw_caption is None:
        raise SampleError("missing_caption", f"sample {key}: no caption (.txt)")
    try:
        caption = raw_caption.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise SampleError("bad_caption", f"sample {key}: caption is not UTF-8 ({exc})") from None
    if not caption:
        raise SampleError("empty_caption", f"sample {key}: empty caption")
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}  # the JSON is optional metadata; a broken one does not cost the sample
    return RawSample(key, str(sample.get("__url__", "")), image, caption, meta)


def raw_samples(samples: Iterable[dict[str, Any]], skipped: Counter[str]) -> Iterator[RawSample]:
    """Keep the usable samples; count the others in `skipped` by reason."""
    for sample in samples:
        if not sample:  # webdataset 1.x ends each shard with an empty marker sample
            continue
        try:
            yield to_raw_sample(sample)
        except SampleError as exc:
            skipped[exc.reason] += 1
            log.debug("skipped: %s", exc)


def iter_shards(spec: str, skipped: Counter[str]) -> Iterator[RawSample]:
    """Read every sample of the shards in `spec` in order (no shuffling, one process)."""
    import webdataset as wds

    def on_error(exc: Exception) -> bool:
        skipped["unreadable_shard_data"] += 1
        log.warning("skipping unreadable shard data: %s", exc)
        return True

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expand_urls(spec)),
        wds.tarfile_to_samples(handler=on_error),
    )
    yield from raw_samples(pipeline, skipped)
