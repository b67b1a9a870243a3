"""Embedding an index build's parts: each part's images in batches of its own, into its chunk.

A part's batches never take another part's images, so a part's chunk (vectors, rows, thumbnails;
serve.indexing.staging) is the same whichever process makes it, and whenever: a resumed build
equals an uninterrupted one. Images come prepared (decoded within the service's bounds, model
inputs and thumbnails made) from serve.indexing.prepare; a progress bar counts them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.shards import IMAGE_EXTENSIONS, RawSample
from serve.encoder import Encoder
from serve.indexing.index import IndexRow
from serve.indexing.prepare import Preparer
from serve.indexing.sources import Part, read_part
from serve.indexing.staging import Chunk, thumbnails_path, write_chunk
from serve.indexing.thumbnails import PackWriter

log = logging.getLogger(__name__)


def counts_images(parts: list[tuple[int, Part]]) -> bool:
    """Whether the progress is counted in images: only folders' parts tell theirs up front."""
    return all(part.kind == "files" for _, part in parts)


def progress_bar(parts: list[tuple[int, Part]], *, disable: bool, force: bool | None) -> tqdm:
    """Images done (embedded or skipped) with rate and ETA: in images where every part is a
    folder's (its file count is known), else in parts."""
    if counts_images(parts):
        total, unit = sum(len(part.files) for _, part in parts), "img"
    else:
        total, unit = len(parts), "part"
    # disable=None: tqdm's own choice, a bar only on a terminal
    return tqdm(
        total=total,
        unit=unit,
        desc="embedding",
        disable=True if disable else (None if force is None else not force),
        dynamic_ncols=True,
        mininterval=0.5,
    )


def embed_parts(
    encoder: Encoder,
    parts: list[tuple[int, Part]],
    batch_size: int,
    preparer: Preparer,
    staging: Path,
    bar: tqdm,
) -> tuple[int, Counter[str]]:
    """Embed `parts` (index, part) one by one, each written as its chunk once done; the images
    embedded and the samples skipped."""
    count, skipped = 0, Counter[str]()
    per_image = counts_images(parts)
    for number, (index, part) in enumerate(parts, 1):
        pack = thumbnails_path(staging, index) if preparer.spec.thumbnails.enabled else None
        tick = bar.update if per_image else lambda n: None
        start = bar.n
        chunk = _embed_part(encoder, part, batch_size, preparer, pack, tick)
        write_chunk(staging, index, chunk)
        count += len(chunk.rows)
        skipped.update(chunk.skipped)
        # a part is one step, or its files (some the reader skipped: unreadable, too large)
        bar.update(start + len(part.files) - bar.n if per_image else 1)
        bar.set_postfix(images=count, skipped=sum(skipped.values()), refresh=False)
        log.debug(
            "part %d (%d of %d here) embedded: %d images so far", index, number, len(parts), count
        )
    return count, skipped


def _embed_part(
    encoder: Encoder,
    part: Part,
    batch_size: int,
    preparer: Preparer,
    pack: Path | None,
    tick: Callable[[int], Any],
) -> Chunk:
    """One part's chunk: its batches never take images of another part, so the chunk is the
    same whichever process makes it, and whenever (a resumed build equals an uninterrupted one).
    `tick(n)`: n more of the part's samples are done."""
    skipped: Counter[str] = Counter()
    vectors: list[np.ndarray] = []
    rows: list[IndexRow] = []
    writer = PackWriter(pack) if pack is not None else None
    try:
        for pixels, thumbnails, batch_rows in _batches(part, skipped, batch_size, preparer, tick):
            vectors.append(encoder.encode_pixels([torch.from_numpy(p) for p in pixels]))  # [B, D]
            if writer is not None:
                for thumbnail in thumbnails:
                    writer.add(thumbnail)
            rows.extend(batch_rows)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, encoder.embed_dim), np.float32)
    return Chunk(stacked, rows, skipped, writer.close() if writer is not None else None)


def _batches(
    part: Part,
    skipped: Counter[str],
    batch_size: int,
    preparer: Preparer,
    tick: Callable[[int], Any],
) -> Iterator[tuple[list[np.ndarray], list[bytes], list[IndexRow]]]:
    """A part's prepared images, thumbnails and rows, `batch_size` at a time; bad ones, and those
    over the service's bounds (never decoded), counted by reason."""
    pixels: list[np.ndarray] = []
    thumbnails: list[bytes] = []
    rows: list[IndexRow] = []
    max_bytes = preparer.spec.bounds.max_image_bytes
    for sample, prepared in preparer.map(read_part(part, skipped, max_image_bytes=max_bytes)):
        tick(1)
        if prepared.pixels is None:
            skipped[prepared.skipped or "corrupt_image"] += 1
            continue
        pixels.append(prepared.pixels)
        thumbnails.append(prepared.thumbnail)
        rows.append(IndexRow(sample.key, sample.caption, _with_origin(sample, part)))
        if len(pixels) == batch_size:
            yield pixels, thumbnails, rows
            pixels, thumbnails, rows = [], [], []
    if pixels:
        yield pixels, thumbnails, rows


def _with_origin(sample: RawSample, part: Part) -> dict[str, Any]:
    """The sample's metadata plus where its image is: shard + member, folder (+ `source`, set by
    serve.indexing.sources), or parquet file + row; fields the sample already has are kept."""
    meta = dict(sample.meta) if isinstance(sample.meta, dict) else {}
    origin: dict[str, Any]
    # file names, not the paths given at build time: results are shown to API clients, which
    # learn nothing of the server's directories (the index manifest's `source` has the paths)
    if part.kind == "shard":
        origin = {"shard": Path(part.location).name, "member": _member_name(sample)}
    elif part.kind == "files":
        origin = {"folder": Path(part.location).name}
    else:
        origin = {"parquet": Path(part.location).name, "row": sample.row}
    for name, value in origin.items():
        meta.setdefault(name, value)
    return meta


def _member_name(sample: RawSample) -> str:
    """The tar member the image was read from: KEY.EXT, EXT as common.shards chose it."""
    return f"{sample.key}.{sample.image_ext or IMAGE_EXTENSIONS[0]}"
