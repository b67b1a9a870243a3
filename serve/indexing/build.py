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
a folder), in a fixed order, so FAISS row ids follow the parts. Each finished part is written at
once to `--parts-dir` (default OUT.parts) as a chunk, durably (serve/indexing/staging.py); a killed
build (SIGKILL, SIGTERM, a lost node) continues with `--resume` from the parts it finished, and
ends equal to an uninterrupted build. Without `--resume` such a leftover is refused. Under
torchrun, rank r embeds parts r, r + N, ...; after a barrier rank 0 merges every chunk in part
order (so the ids are those of a one-process build), builds the index and removes the parts.
The on-disk tier (`--on-disk`) is built by every rank: rank 0 trains it once on a sample, each
rank adds its own parts to lists files of its own, and rank 0 merges them on disk
(serve/indexing/part_lists.py); the rows' metadata streams from the parts into SQLite.
Every image is held to the service's per-image bounds (bytes, pixels, pixels once resized:
`DUET_MAX_UPLOAD_BYTES`, `DUET_MAX_IMAGE_PIXELS`, `DUET_MAX_RESIZED_PIXELS`) from its header,
before it is decoded. Samples that cannot be used are skipped, counted by kind, and summed over
ranks in the index manifest.

Each indexed image also gets a thumbnail (`--thumbnails webp|jpeg|none`, longest side
`--thumbnail-px`, serve/indexing/thumbnails.py), written as it is embedded to its part's chunk and
merged in the same part order as the rows. Each row's metadata says where its image came from:
`shard` + `member` (a tar shard), `source` (a folder's file, relative path; `folder` is the
folder), or `parquet` + `row`; img2dataset's own `url` and `key` stay as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from common.artifact import load_artifact
from common.onnx_towers import OnnxExportError, load_checked
from serve.encoder import Encoder
from serve.indexing.embed import embed_parts, progress_bar
from serve.indexing.index import IndexRow, write_index
from serve.indexing.part_lists import PartLists, add_parts, train_lists
from serve.indexing.prepare import ImageBounds, Preparer, PrepareSpec
from serve.indexing.sources import Part, list_parts
from serve.indexing.staging import (
    Chunk,
    PartialBuildError,
    artifact_digest,
    begin,
    merge,
    parts_digest,
)
from serve.indexing.thumbnails import THUMBNAIL_FORMATS, ThumbnailSpec
from serve.indexing.vector_search import INDEX_TYPES, IndexSpec, plan_index

log = logging.getLogger(__name__)
T = TypeVar("T")
RUNTIMES = ("torch", "onnx", "onnx-int8")  # the service's DUET_RUNTIME values
# A quarter of the cores, at most 8: the encoder's threads use the rest. None below 4 cores: there
# a worker takes a core from the encoder (2 shared cores, ViT-B-32, 300 640x480 JPEGs: 50 s
# without, 54-83 s with one). Decoding pays where encoding is cheap: GPU, ONNX int8, big photos.
DEFAULT_WORKERS = min(8, (os.cpu_count() or 1) // 4)

BARRIER_TIMEOUT = timedelta(hours=12)  # ranks with fewer or smaller shards wait for the slowest


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
    resume: bool = False,
    runtime: str = "torch",
    workers: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Embed every usable image in `data` with the artifact in `model_dir`; write `out_dir`.

    Each part's embeddings (and thumbnails) are written as a chunk to `parts_dir` (default:
    `OUT.parts`, beside `out_dir`) as soon as the part is done (serve.indexing.staging); under
    torchrun (WORLD_SIZE > 1) each rank embeds its share of the parts and rank 0 merges every
    chunk in part order. `resume`: continue the partial build left there by a killed one (else
    such a leftover is refused). `thumbnails`: how to make them (default WebP, 256 px; format
    "none": no thumbnails). `runtime`: what runs the image tower, as the service's DUET_RUNTIME:
    "torch", or the artifact's ONNX towers ("onnx", "onnx-int8": CPU only; the int8 files exist
    only where they passed their export's quality gate, `common.onnx_towers`; checked against the
    torch model before any image is read, `load_encoder`). `workers`: processes
    that decode and preprocess ahead of the encoder (0: this one, serve.indexing.prepare).
    `progress`: a progress bar on stderr (None: when it is a terminal).
    Returns the summary: count, dim, skipped counts by reason, and the seconds and images per
    second of reading + decoding + embedding in this run (model loading not included); on ranks
    other than 0 the same for that rank's parts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    model_dir = Path(model_dir).resolve()
    parts = list_parts(data)  # before the model loads: a wrong input fails at once
    encoder = load_encoder(model_dir, runtime, device)
    bounds = ImageBounds.of_service(encoder.preprocess_cfg)
    thumbnails = thumbnails or ThumbnailSpec()
    staging = Path(parts_dir) if parts_dir else Path(f"{out_dir}.parts")
    record = {
        "model": _model_record(encoder, model_dir),
        "runtime": runtime,
        "source": data,
        "image_bounds": bounds.manifest(),
    }
    build = {
        **record,
        "artifact_digest": artifact_digest(model_dir),
        "part_count": len(parts),
        "parts_digest": parts_digest(parts),
        "thumbnails": dataclasses.asdict(thumbnails),
        "batch_size": batch_size,
    }
    job = _Job(Path(out_dir), staging, parts, record, build, batch_size, spec, thumbnails)
    start = time.perf_counter()  # throughput of reading, decoding and embedding; not model load
    # its workers first: forked before the process group's threads exist (serve.indexing.prepare)
    preparer = Preparer(PrepareSpec(encoder.preprocess_cfg, bounds, thumbnails), workers)
    try:
        return _run(job, encoder, preparer, start, resume=resume, progress=progress)
    finally:
        preparer.close()


@dataclass(frozen=True, slots=True)
class _Job:
    """What a build makes, from what, and how (`build_index`'s arguments, resolved)."""

    out_dir: Path
    staging: Path  # the parts folder: chunks, serve.indexing.staging
    parts: list[Part]
    record: dict[str, Any]  # for the manifest: model, runtime, source, image bounds
    build: dict[str, Any]  # for build.json: the record and what else makes the vectors
    batch_size: int
    spec: IndexSpec | None
    thumbnails: ThumbnailSpec


def _run(
    job: _Job,
    encoder: Encoder,
    preparer: Preparer,
    start: float,
    *,
    resume: bool,
    progress: bool | None,
) -> dict[str, Any]:
    """Embed this rank's unfinished parts into chunks; rank 0 then merges them into the index."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    with _ranks(rank, world_size) as ranks:
        done = set(ranks.first(lambda: begin(job.staging, job.build, resume=resume)))
        if done and rank == 0:
            log.info("resuming: %d of %d parts were embedded before", len(done), len(job.parts))
        mine = [
            (i, part)
            for i, part in enumerate(job.parts)
            if i % world_size == rank and i not in done
        ]
        bar = progress_bar(mine, disable=rank != 0 or progress is False, force=progress)
        try:
            count, skipped = embed_parts(encoder, mine, job.batch_size, preparer, job.staging, bar)
        finally:
            bar.close()
        ranks.barrier()
        merged: list[Chunk] = []  # rank 0's merge, kept from here to the write
        lists = ranks.first(lambda: _merge(job, encoder.embed_dim, merged))
        if lists is not None:  # the on-disk tier: every rank adds its own parts' vectors
            adding = time.perf_counter()
            own = [i for i in range(len(job.parts)) if i % world_size == rank]
            added = add_parts(lists, own)
            log.info(
                "rank %d: added %d vectors of its %d parts to its lists", rank, added, len(own)
            )
            ranks.barrier()
            lists = dataclasses.replace(lists, add_seconds=time.perf_counter() - adding)
    if rank != 0:
        return _summary(job.out_dir, count, count, skipped, encoder.embed_dim, start, rank=rank)
    text_queries = _caption_queries(encoder, merged[0].rows, job.spec or IndexSpec())
    summary = _write(job, merged[0], count, start, text_queries, lists)
    shutil.rmtree(job.staging, ignore_errors=True)  # only now: a failed merge or write resumes
    return summary


def _merge(job: _Job, dim: int, out: list[Chunk]) -> PartLists | None:
    """Rank 0: every part's chunk merged (into `out`); for the on-disk tier, the index trained
    on a sample of it, for every rank to add its parts to (None: rank 0 builds it alone)."""
    merged = merge(job.staging, len(job.parts), dim, job.thumbnails.enabled)
    if not len(merged.rows):
        shutil.rmtree(job.staging, ignore_errors=True)  # nothing worth resuming
        raise ValueError(
            f"no usable samples in {job.record['source']!r} "
            f"(skipped: {dict(merged.skipped) or 'none'})"
        )
    out.append(merged)
    plan = plan_index(job.spec or IndexSpec(), len(merged.rows), dim)
    if not plan.on_disk:
        return None
    return train_lists(job.staging, plan, merged.vectors, len(job.parts))


def _caption_queries(encoder: Encoder, rows: Iterable[IndexRow], spec: IndexSpec) -> np.ndarray:
    """Up to `spec.recall_queries` sampled captions through the text tower [Q, D]: the queries
    whose recall the manifest reports beside the image-query figure."""
    captions = sample_captions(rows, spec.recall_queries, spec.seed)
    if not captions:
        return np.zeros((0, encoder.embed_dim), np.float32)
    return np.concatenate(
        [encoder.encode_texts(captions[i : i + 256]) for i in range(0, len(captions), 256)]
    )


def sample_captions(rows: Iterable[IndexRow], n: int, seed: int) -> list[str]:
    """`n` captions drawn uniformly from the rows that have one, in row order, in one pass that
    holds only them: each captioned row gets a random key and the `n` largest keys are kept."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[float, int, str]] = []  # a min-heap of (key, row, caption)
    for i, row in enumerate(rows):
        if not row.caption.strip():
            continue
        entry = (float(rng.random()), i, row.caption)
        if len(kept) < n:
            heapq.heappush(kept, entry)
        elif entry > kept[0]:
            heapq.heapreplace(kept, entry)
    return [caption for _, _, caption in sorted(kept, key=lambda entry: entry[1])]


def load_encoder(model_dir: Path, runtime: str, device: str) -> Encoder:
    """The artifact's encoder on `runtime`. ONNX towers are first checked against the torch
    model (`verify_towers`, as the service does at start): an index is never built with towers
    that do not match their artifact. The torch weights are freed before the towers load
    (`load_checked`): the encoder keeps only tokenizer and transform."""
    loaded = load_artifact(model_dir, device=device)
    variant = _onnx_variant(runtime, device)
    if variant is None:
        return Encoder(loaded, device)
    return Encoder(loaded, device, load_checked(loaded, model_dir, variant))


def _onnx_variant(runtime: str, device: str) -> str | None:
    """The ONNX towers `runtime` names (None: the torch model runs them)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        return None
    if device != "cpu":
        raise ValueError(f"runtime {runtime} runs on the CPU; device is {device}")
    return "int8" if runtime == "onnx-int8" else "fp32"


def _model_record(encoder: Encoder, model_dir: Path) -> dict[str, Any]:
    return {"name": encoder.model_name, "embed_dim": encoder.embed_dim, "artifact": str(model_dir)}


def _write(
    job: _Job,
    merged: Chunk,
    embedded_here: int,
    start: float,
    text_queries: np.ndarray | None,
    lists: PartLists | None,
) -> dict[str, Any]:
    """Rank 0: the index from every part's chunk (and, on disk, every rank's lists), and the
    build's summary."""
    seconds = round(time.perf_counter() - start, 3)
    extra = {
        **job.record,
        "skipped": dict(merged.skipped),
        "build_seconds": seconds,
        "build_processes": int(os.environ.get("WORLD_SIZE", 1)),
    }
    write_index(
        job.out_dir,
        merged.vectors,
        merged.rows,
        extra,
        spec=job.spec,
        thumbnails=merged.thumbnails,
        thumbnail_spec=job.thumbnails,
        text_queries=text_queries,
        lists=lists,
    )
    dim = merged.vectors.shape[1]
    count = len(merged.rows)
    return _summary(
        job.out_dir, count, embedded_here, merged.skipped, dim, start, rank=0, seconds=seconds
    )


def _summary(
    out_dir: str | Path,
    count: int,
    embedded_here: int,
    skipped: Counter[str],
    dim: int,
    start: float,
    *,
    rank: int,
    seconds: float | None = None,
) -> dict[str, Any]:
    """`count`: rows of the index (rank 0) or embedded by this rank; the rate counts the images
    embedded in this run (`embedded_here`): a resumed build's earlier parts cost it nothing."""
    seconds = seconds if seconds is not None else round(time.perf_counter() - start, 3)
    return {
        "out": str(out_dir),
        "rank": rank,
        "count": count,
        "dim": dim,
        "skipped": dict(skipped),
        "seconds": seconds,
        "images_per_second": round(embedded_here / max(seconds, 1e-3), 1),
    }


# --- torchrun: a barrier, and rank 0's word --------------------------------------------------


class _Ranks:
    """The processes of a build. Only decisions and a barrier cross processes (gloo; the data
    goes through the staging folder, which can be on storage shared by nodes), so gloo serves
    whatever device embeds."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def first(self, run: Callable[[], T]) -> T:
        """`run()` on rank 0 only; its result on every rank, or its error raised on every rank."""
        if self.world_size == 1:
            return run()
        import torch.distributed as dist

        outcome: list[Any] = [None]
        error: Exception | None = None
        if self.rank == 0:
            try:
                outcome = [("ok", run())]
            except Exception as exc:  # every rank must hear of it, or the others wait forever
                error, outcome = exc, [("error", f"{type(exc).__name__}: {exc}")]
        dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if error is not None:
            raise error
        if kind == "error":
            raise PartialBuildError(f"rank 0: {value}")
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


@contextlib.contextmanager
def _ranks(rank: int, world_size: int) -> Iterator[_Ranks]:
    if world_size == 1:
        yield _Ranks(rank, world_size)
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield _Ranks(rank, world_size)
    finally:
        dist.destroy_process_group()


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
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="processes decoding and preprocessing ahead of the encoder (0: none; default: a "
        f"quarter of the cores, at most 8: {DEFAULT_WORKERS} here)",
    )
    parser.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help="what embeds: the torch model, or the artifact's ONNX towers (CPU; "
        "`python -m common.onnx_towers ARTIFACT [--int8]` makes them)",
    )
    parser.add_argument(
        "--parts-dir", help="where each finished part's chunk is written (default OUT.parts)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the partial build a killed one left in the parts dir (without it, such a "
        "leftover is refused)",
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
        (
            "--rerank-factor",
            "approximate types: exact re-scoring of k x this candidates (unset: raised from the "
            "default until recall@10 reaches --recall-target)",
        ),
    ):
        knobs.add_argument(flag, type=int, help=help_text)
    knobs.add_argument(
        "--pq-nbits", type=int, help="ivfpq: bits per code (default 4: fast-scan; on disk 8)"
    )
    knobs.add_argument(
        "--on-disk",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ivfpq: inverted lists in a file, built in blocks, served memory-mapped and "
        "read-only (default: from 10M vectors)",
    )
    knobs.add_argument(
        "--recall-queries", type=int, default=1000, help="sampled queries for recall@10 (0: skip)"
    )
    knobs.add_argument(
        "--recall-target",
        type=float,
        default=0.95,
        help="recall@10 (image and text queries) an unset --rerank-factor is raised to reach",
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
        on_disk=args.on_disk,
        nprobe=args.nprobe,
        rerank_factor=args.rerank_factor,
        recall_queries=args.recall_queries,
        recall_target=args.recall_target,
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
            resume=args.resume,
            runtime=args.runtime,
            workers=args.workers,
            thumbnails=ThumbnailSpec(
                format=args.thumbnails,
                max_side_px=args.thumbnail_px,
                quality=args.thumbnail_quality,
            ),
        )
    except (FileNotFoundError, ValueError, OnnxExportError) as exc:
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
