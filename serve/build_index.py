"""`python -m serve.build_index`: embed the images of a shard set and write a search index.

    python -m serve.build_index --model runs/demo/artifact \
        --data 'data/synth/val/shard-{000000..000001}.tar' --out runs/demo/index \
        [--batch-size 256] [--device cpu]

Samples are read in shard order, so FAISS row ids follow the shards; samples that cannot be used
(no image or caption, undecodable image) are skipped and counted by reason in the index manifest.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.artifact import load_artifact
from common.preprocess import ImageTooLargeError, InvalidImageError, load_image
from common.shards import iter_shards
from serve.encoder import Encoder
from serve.index import IndexRow, write_index

log = logging.getLogger(__name__)

PROGRESS_EVERY_BATCHES = 20


def build_index(
    model_dir: str | Path,
    data: str,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, Any]:
    """Embed every usable image in shards `data` with the artifact in `model_dir`; write `out_dir`.

    Returns the summary: count, dim, skipped counts by reason, and the seconds and images per
    second of reading + decoding + embedding (model loading not included).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_dir = Path(model_dir).resolve()
    encoder = Encoder(load_artifact(model_dir, device=device), device)
    start = time.perf_counter()  # throughput of reading, decoding and embedding; not model load
    skipped: Counter[str] = Counter()
    chunks: list[np.ndarray] = []
    rows: list[IndexRow] = []
    for batch_number, (images, batch_rows) in enumerate(_batches(data, skipped, batch_size), 1):
        chunks.append(encoder.encode_images(images))  # [B, D]
        rows.extend(batch_rows)
        if batch_number % PROGRESS_EVERY_BATCHES == 0:
            log.info("embedded %d images (%d skipped)", len(rows), sum(skipped.values()))
    if not rows:
        raise ValueError(f"no usable samples in {data!r} (skipped: {dict(skipped) or 'none'})")
    seconds = round(time.perf_counter() - start, 3)
    model = {"name": encoder.model_name, "embed_dim": encoder.embed_dim, "artifact": str(model_dir)}
    write_index(
        out_dir,
        np.concatenate(chunks),
        rows,
        {"model": model, "source": data, "skipped": dict(skipped), "build_seconds": seconds},
    )
    return {
        "out": str(out_dir),
        "count": len(rows),
        "dim": encoder.embed_dim,
        "skipped": dict(skipped),
        "seconds": seconds,
        "images_per_second": round(len(rows) / max(seconds, 1e-3), 1),
    }


def _batches(
    data: str, skipped: Counter[str], batch_size: int
) -> Iterator[tuple[list[Image.Image], list[IndexRow]]]:
    """Decoded images and their rows, `batch_size` at a time; bad images counted in `skipped`."""
    images: list[Image.Image] = []
    rows: list[IndexRow] = []
    for sample in iter_shards(data, skipped):
        try:
            image = load_image(sample.image)
        except ImageTooLargeError as exc:
            skipped["image_too_large"] += 1
            log.debug("skipped %s: %s", sample.key, exc)
            continue
        except InvalidImageError as exc:
            skipped["corrupt_image"] += 1
            log.debug("skipped %s: %s", sample.key, exc)
            continue
        images.append(image)
        rows.append(IndexRow(sample.key, sample.caption, sample.meta))
        if len(images) == batch_size:
            yield images, rows
            images, rows = [], []
    if images:
        yield images, rows


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve.build_index", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", required=True, help="model artifact directory")
    parser.add_argument(
        "--data", required=True, help="shards: brace patterns, several joined by '::'"
    )
    parser.add_argument("--out", required=True, help="index directory to write (replaced)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        summary = build_index(
            args.model, args.data, args.out, batch_size=args.batch_size, device=args.device
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"indexed {summary['count']} images (dim {summary['dim']}) into {summary['out']} "
        f"in {summary['seconds']:.1f} s ({summary['images_per_second']:.1f} images/s); "
        f"skipped: {summary['skipped'] or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
