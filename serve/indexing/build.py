r"""`python -m serve.build_index`: embed the images of shards, folders or parquet into an index.

    python -m serve.build_index --model runs/demo/artifact \
        --data 'data/synth/val/shard-{000000..000001}.tar' --out runs/demo/index \
        [--batch-size 256] [--device cpu] [--index-type auto|flat|hnsw|ivfpq] [knobs ...]
    python -m serve.build_index --model artifacts/vit-b-32 --data ~/Pictures --out runs/photos
    python -m serve.build_index --model ... --data 'laion/{00000..00099}.parquet' --out ...

    # many inputs: one process per device (CPU: gloo, GPU: --device cuda = cuda:LOCAL_RANK)
    torchrun --standalone --nproc_per_node=4 -m serve.build_index --model ... --data ... --out ...

`--data` takes webdataset shards, folders of image files and img2dataset parquet files, joined by
`::` (serve/indexing/sources.py). They are read part by part (a shard, a parquet file, 1000 files of
a folder), so FAISS row ids follow the parts. Under torchrun, rank r embeds parts r, r + N, ... and
writes its vectors and rows to `--parts-dir`; after a barrier rank 0 merges them in part order (so
the ids are those of a one-process build), builds the index and removes the parts. Samples that
cannot be used (no image, undecodable image, unreadable file) are skipped, counted by reason, and
summed over ranks in the index manifest.

Each indexed image also gets a thumbnail (`--thumbnails webp|jpeg|none`, longest side `--thumbnail-
px`, serve/indexing/thumbnails.py), written as it is embedded to a packed file per process in the
parts directory and merged in the same part order as the rows. Each row's metadata says where its
image came from: `shard` + `member` (a tar shard), `source` (a folder's file, relative path;
`folder` is the folder), or `parquet` + `row`; img2dataset's own `url` and `key` stay as they are.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.artifact import load_artifact
from common.preprocess import PreprocessCfg, ResizeLimit, decode_or_skip
from common.shards import IMAGE_EXTENSIONS, RawSample
from serve.cost import resize_limit
from serve.encoder import Encoder
from serve.indexing.index import IndexRow, write_index
from serve.indexing.sources import Part, list_parts, read_part
from serve.indexing.thumbnails import (
    THUMBNAIL_FORMATS,
    Pack,
    PackWriter,
    ThumbnailSpec,
    make_thumbnail,
    merge_packs,
)
from serve.indexing.vector_search import INDEX_TYPES, IndexSpec
from serve.settings import ImageLimits

log = logging.getLogger(__name__)

PROGRESS_EVERY_BATCHES = 20
BARRIER_TIMEOUT = timedelta(hours=12)  # ranks with fewer or smaller shards wait for the slowest


@dataclass(frozen=True, slots=True)
class ImageBounds:
    """The service's per-image bounds, held by every image a build reads (one rule): bytes
    before reading or decoding, decoded pixels and pixels once resized from the header."""

    max_image_bytes: int
    max_image_pixels: int
    resize: ResizeLimit

    @classmethod
    def of_service(cls, cfg: PreprocessCfg) -> ImageBounds:
        """The bounds a service on this artifact holds, its DUET_* environment included
        (DUET_MAX_UPLOAD_BYTES, DUET_MAX_IMAGE_PIXELS, DUET_MAX_RESIZED_PIXELS)."""
        limits = ImageLimits()
        resize = resize_limit(limits, cfg)
        return cls(limits.max_upload_bytes, limits.max_image_pixels, resize)

    def manifest(self) -> dict[str, int]:
        return {
            "max_image_bytes": self.max_image_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_resized_pixels": self.resize.max_pixels,
        }


@dataclass(slots=True)
class Embedded:
    """The embeddings of one process's parts: vectors [n, D], their rows, each row's part, and
    the rows' thumbnails (None: built without)."""

    vectors: np.ndarray
    rows: list[IndexRow]
    shards: list[int]
    skipped: Counter[str]
    thumbnails: Pack | None = None


def build_index(
    model_dir: str | Path,
    data: str,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    spec: IndexSpec | None = None,
    parts_dir: str | Path | None = None,
    thumbnails: ThumbnailSpec | None = None,
) -> dict[str, Any]:
    """Embed every usable image in `data` with the artifact in `model_dir`; write `out_dir`.

    Under torchrun (WORLD_SIZE > 1) each rank embeds its share of the parts and rank 0 writes
    the index from every rank's part in `parts_dir` (default: `OUT.parts`, beside `out_dir`;
    a one-process build stages its thumbnails there too). `thumbnails`: how to make them
    (default WebP, 256 px; format "none": no thumbnails).
    Returns the summary: count, dim, skipped counts by reason, and the seconds and images per
    second of reading + decoding + embedding (model loading not included); on ranks other than 0
    the same for that rank's part.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    model_dir = Path(model_dir).resolve()
    parts = list_parts(data)  # before the model loads: a wrong input fails at once
    encoder = Encoder(load_artifact(model_dir, device=device), device)
    bounds = ImageBounds.of_service(encoder.preprocess_cfg)
    start = time.perf_counter()  # throughput of reading, decoding and embedding; not model load
    mine = [(i, part) for i, part in enumerate(parts) if i % world_size == rank]
    thumbnails = thumbnails or ThumbnailSpec()
    parts_path = Path(parts_dir) if parts_dir else Path(f"{out_dir}.parts")
    try:
        embedded = _embed(encoder, mine, batch_size, bounds, thumbnails, parts_path, rank)
        if world_size > 1:
            embedded = _exchange_parts(embedded, parts_path, rank, world_size)
            if rank != 0:
                return _summary(out_dir, embedded, encoder.embed_dim, start, rank=rank)
        extra = {"model": _model_record(encoder, model_dir), "source": data}
        extra["image_bounds"] = bounds.manifest()
        return _write(out_dir, embedded, encoder.embed_dim, extra, start, spec, thumbnails, rank)
    finally:
        if rank == 0:
            shutil.rmtree(parts_path, ignore_errors=True)


def _model_record(encoder: Encoder, model_dir: Path) -> dict[str, Any]:
    return {"name": encoder.model_name, "embed_dim": encoder.embed_dim, "artifact": str(model_dir)}


def _write(
    out_dir: str | Path,
    embedded: Embedded,
    dim: int,
    extra: dict[str, Any],
    start: float,
    spec: IndexSpec | None,
    thumbnails: ThumbnailSpec,
    rank: int,
) -> dict[str, Any]:
    """Rank 0: the index from every rank's rows (and thumbnails), and the build's summary;
    `extra`: the manifest's model, source and image bounds."""
    if not embedded.rows:
        raise ValueError(
            f"no usable samples in {extra['source']!r} "
            f"(skipped: {dict(embedded.skipped) or 'none'})"
        )
    seconds = round(time.perf_counter() - start, 3)
    extra = {
        **extra,
        "skipped": dict(embedded.skipped),
        "build_seconds": seconds,
        "build_processes": int(os.environ.get("WORLD_SIZE", 1)),
    }
    write_index(
        out_dir,
        embedded.vectors,
        embedded.rows,
        extra,
        spec=spec,
        thumbnails=embedded.thumbnails,
        thumbnail_spec=thumbnails,
    )
    return _summary(out_dir, embedded, dim, start, rank=rank, seconds=seconds)


def _summary(
    out_dir: str | Path,
    embedded: Embedded,
    dim: int,
    start: float,
    *,
    rank: int,
    seconds: float | None = None,
) -> dict[str, Any]:
    seconds = seconds if seconds is not None else round(time.perf_counter() - start, 3)
    return {
        "out": str(out_dir),
        "rank": rank,
        "count": len(embedded.rows),
        "dim": dim,
        "skipped": dict(embedded.skipped),
        "seconds": seconds,
        "images_per_second": round(len(embedded.rows) / max(seconds, 1e-3), 1),
    }


def _embed(
    encoder: Encoder,
    shards: list[tuple[int, Part]],
    batch_size: int,
    bounds: ImageBounds,
    thumbnails: ThumbnailSpec,
    parts: Path,
    rank: int,
) -> Embedded:
    """Embed the usable images of `shards` (index, part) in order, thumbnails to a pack in
    `parts`; count the skipped ones."""
    skipped: Counter[str] = Counter()
    chunks: list[np.ndarray] = []
    rows: list[IndexRow] = []
    shard_of_row: list[int] = []
    writer = None
    if thumbnails.enabled:
        parts.mkdir(parents=True, exist_ok=True)
        writer = PackWriter(parts / f"part-{rank:05d}.thumbnails.bin")
    try:
        batches = _batches(shards, skipped, batch_size, bounds)
        for batch_number, (images, batch_rows, batch_shards) in enumerate(batches, 1):
            chunks.append(encoder.encode_images(images))  # [B, D]
            if writer is not None:
                for image in images:
                    writer.add(make_thumbnail(image, thumbnails))
            rows.extend(batch_rows)
            shard_of_row.extend(batch_shards)
            if batch_number % PROGRESS_EVERY_BATCHES == 0:
                log.info("embedded %d images (%d skipped)", len(rows), sum(skipped.values()))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.embed_dim), np.float32)
    pack = writer.close() if writer is not None else None
    return Embedded(vectors, rows, shard_of_row, skipped, pack)


def _batches(
    shards: list[tuple[int, Part]], skipped: Counter[str], batch_size: int, bounds: ImageBounds
) -> Iterator[tuple[list[Image.Image], list[IndexRow], list[int]]]:
    """Decoded images, their rows and part indices, `batch_size` at a time; bad ones, and those
    over the service's `bounds` (never decoded), counted by reason."""
    images: list[Image.Image] = []
    rows: list[IndexRow] = []
    shard_of_row: list[int] = []
    for shard_index, part in shards:
        for sample in read_part(part, skipped, max_image_bytes=bounds.max_image_bytes):
            image = decode_or_skip(
                sample.image,
                skipped,
                key=sample.key,
                resize=bounds.resize,
                max_pixels=bounds.max_image_pixels,
            )
            if image is None:
                continue
            images.append(image)
            rows.append(IndexRow(sample.key, sample.caption, _with_origin(sample, part)))
            shard_of_row.append(shard_index)
            if len(images) == batch_size:
                yield images, rows, shard_of_row
                images, rows, shard_of_row = [], [], []
    if images:
        yield images, rows, shard_of_row


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


# --- torchrun: parts on disk, merged by rank 0 -------------------------------------------------


def _exchange_parts(embedded: Embedded, parts: Path, rank: int, world_size: int) -> Embedded:
    """Write this rank's part, wait for every rank; rank 0 gets all parts merged in shard order."""
    import torch.distributed as dist

    # Only a barrier crosses processes (the data goes through the parts directory, which can be
    # on storage shared by nodes), so gloo serves whatever device embeds.
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        _write_part(parts, rank, embedded)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return embedded
    return _merge_parts(parts, [_read_part(parts, r) for r in range(world_size)])


def _write_part(parts: Path, rank: int, embedded: Embedded) -> None:
    parts.mkdir(parents=True, exist_ok=True)
    stem = parts / f"part-{rank:05d}"
    np.save(f"{stem}.npy", embedded.vectors)
    with open(f"{stem}.jsonl", "w") as f:
        for row, shard in zip(embedded.rows, embedded.shards, strict=True):
            record = {"shard": shard, "key": row.key, "caption": row.caption, "meta": row.meta}
            f.write(json.dumps(record) + "\n")
    done = {"rank": rank, "count": len(embedded.rows), "skipped": dict(embedded.skipped)}
    # Written last, and renamed into place: its presence says the part is complete.
    Path(f"{stem}.json.tmp").write_text(json.dumps(done))
    os.replace(f"{stem}.json.tmp", f"{stem}.json")


def _read_part(parts: Path, rank: int) -> Embedded:
    stem = parts / f"part-{rank:05d}"
    if not Path(f"{stem}.json").is_file():
        raise RuntimeError(f"{stem}.json not found: rank {rank} did not finish its part")
    done = json.loads(Path(f"{stem}.json").read_text())
    vectors = np.load(f"{stem}.npy")
    with open(f"{stem}.jsonl") as f:
        records = [json.loads(line) for line in f]
    if not len(vectors) == len(records) == done["count"]:
        raise RuntimeError(f"part {stem}: {len(vectors)} vectors, {len(records)} rows")
    rows = [IndexRow(r["key"], r["caption"], r["meta"]) for r in records]
    thumbnails_path = Path(f"{stem}.thumbnails.bin")
    pack = Pack.open(thumbnails_path) if thumbnails_path.is_file() else None
    if pack is not None and len(pack) != len(rows):
        raise RuntimeError(f"part {stem}: {len(pack)} thumbnails for {len(rows)} rows")
    shards = [r["shard"] for r in records]
    return Embedded(vectors, rows, shards, Counter(done["skipped"]), pack)


def _merge_parts(directory: Path, parts: list[Embedded]) -> Embedded:
    """One Embedded in shard order: a stable sort by shard keeps each shard's sample order;
    the thumbnails follow the rows into one pack in `directory`."""
    shards = np.array([s for part in parts for s in part.shards], dtype=np.int64)
    order = np.argsort(shards, kind="stable")
    rows = [row for part in parts for row in part.rows]
    vectors = np.concatenate([part.vectors for part in parts])[order]
    skipped: Counter[str] = Counter()
    for part in parts:
        skipped.update(part.skipped)
    packs = [part.thumbnails for part in parts if part.thumbnails is not None]
    merged = None
    if len(packs) == len(parts):  # every rank made thumbnails (or none did)
        merged = merge_packs(packs, order, directory / "thumbnails.bin")
    return Embedded(vectors, [rows[i] for i in order], shards[order].tolist(), skipped, merged)


# --- command line ------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve.build_index",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--model", required=True, help="model artifact directory")
    parser.add_argument(
        "--data",
        required=True,
        help="shards (brace patterns), folders of images, img2dataset .parquet; joined by '::'",
    )
    parser.add_argument("--out", required=True, help="index directory to write (replaced)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda (under torchrun: per rank), cuda:0"
    )
    parser.add_argument(
        "--parts-dir", help="where ranks write their parts and thumbnails are staged (OUT.parts)"
    )
    parser.add_argument(
        "--thumbnails",
        default="webp",
        choices=THUMBNAIL_FORMATS,
        help="thumbnail format stored in the index (none: no thumbnails)",
    )
    parser.add_argument(
        "--thumbnail-px", type=int, default=256, help="longest side of a thumbnail in pixels"
    )
    parser.add_argument(
        "--thumbnail-quality", type=int, default=80, help="thumbnail encoder quality, 1-100"
    )
    knobs = parser.add_argument_group("index type and knobs (unset: derived from the count)")
    knobs.add_argument("--index-type", default="auto", choices=INDEX_TYPES)
    for flag, help_text in (
        ("--hnsw-m", "hnsw: graph neighbours per node"),
        ("--ef-construction", "hnsw: candidate list while building"),
        ("--ef-search", "hnsw: candidate list while searching"),
        ("--nlist", "ivfpq: k-means cells"),
        ("--pq-m", "ivfpq: sub-quantisers; must divide D"),
        ("--nprobe", "ivfpq: cells searched per query"),
        ("--rerank-factor", "approximate types: exact re-scoring of k x this candidates"),
    ):
        knobs.add_argument(flag, type=int, help=help_text)
    knobs.add_argument(
        "--pq-nbits", type=int, default=4, help="ivfpq: bits per code (4: fast-scan)"
    )
    knobs.add_argument(
        "--recall-queries", type=int, default=1000, help="sampled queries for recall@10 (0: skip)"
    )
    return parser.parse_args(argv)


def _spec(args: argparse.Namespace) -> IndexSpec:
    return IndexSpec(
        index_type=args.index_type,
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        nlist=args.nlist,
        pq_m=args.pq_m,
        pq_nbits=args.pq_nbits,
        nprobe=args.nprobe,
        rerank_factor=args.rerank_factor,
        recall_queries=args.recall_queries,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        summary = build_index(
            args.model,
            args.data,
            args.out,
            batch_size=args.batch_size,
            device=args.device,
            spec=_spec(args),
            parts_dir=args.parts_dir,
            thumbnails=ThumbnailSpec(
                format=args.thumbnails,
                max_side_px=args.thumbnail_px,
                quality=args.thumbnail_quality,
            ),
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary["rank"] != 0:
        log.info("rank %d: embedded %d images", summary["rank"], summary["count"])
        return 0
    print(
        f"indexed {summary['count']} images (dim {summary['dim']}) into {summary['out']} "
        f"in {summary['seconds']:.1f} s ({summary['images_per_second']:.1f} images/s); "
        f"skipped: {summary['skipped'] or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
