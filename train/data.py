"""The training data pipeline: webdataset 1.x stages, each a small named function.

shard list -> per-epoch shard shuffle -> split by rank -> split by worker -> tar -> samples
-> sample shuffle -> decode + augment (bad samples skipped and counted) -> batch + tokenize

Every batch carries the number of samples its worker skipped since its previous batch, by reason,
so that the trainer can count them across worker processes and ranks.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from common.preprocess import InvalidImageError, Tokenizer, Transform, load_image
from common.shards import expand_urls, raw_samples
from train.config import DataConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Batch:
    images: torch.Tensor  # [B, 3, H, W]
    tokens: torch.Tensor  # [B, L]
    skipped: dict[
        str, int
    ]  # samples skipped (by reason) by this batch's worker since its last batch


def shuffled_shards(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The same shard order on every rank for a given (seed, epoch), different across epochs."""
    order = list(urls)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def split_by_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Every world_size-th shard, so ranks read disjoint shards."""
    return urls[rank::world_size]


def split_by_worker(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Within a rank, each DataLoader worker takes every num_workers-th shard."""
    info = get_worker_info()
    if info is None:
        yield from src
    else:
        yield from itertools.islice(src, info.id, None, info.num_workers)


def count_shard_error(skipped: Counter[str], exc: Exception) -> bool:
    """webdataset handler: an unreadable shard or tar member is counted and skipped."""
    skipped["unreadable_shard_data"] += 1
    log.warning("skipping unreadable shard data: %s", exc)
    return True


def decode_samples(
    src: Iterable[dict[str, Any]], skipped: Counter[str], transform: Transform, max_pixels: int
) -> Iterator[tuple[torch.Tensor, str]]:
    """Raw samples -> (augmented image tensor, caption); corrupt images skipped and counted."""
    for sample in raw_samples(src, skipped):
        try:
            image = load_image(sample.image, max_pixels=max_pixels)
        except InvalidImageError as exc:
            skipped["corrupt_image"] += 1
            log.debug("skipped sample %s: %s", sample.key, exc)
            continue
        yield transform(image), sample.caption


def batch_samples(
    src: Iterable[tuple[torch.Tensor, str]],
    skipped: Counter[str],
    tokenize: Tokenizer,
    batch_size: int,
) -> Iterator[Batch]:
    """Full batches only (a partial batch would give ranks different sizes); tokenized at once."""
    images: list[torch.Tensor] = []
    captions: list[str] = []
    for image, caption in src:
        images.append(image)
        captions.append(caption)
        if len(images) == batch_size:
            delta = dict(skipped)
            skipped.clear()
            yield Batch(torch.stack(images), tokenize(captions), delta)
            images, captions = [], []


def epoch_pipeline(
    cfg: DataConfig,
    urls: list[str],
    transform: Transform,
    tokenize: Tokenizer,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
) -> wds.DataPipeline:
    """One epoch over this rank's shards as a webdataset pipeline (an IterableDataset)."""
    skipped: Counter[str] = Counter()
    worker_seed = seed * 1_000_003 + epoch * 1_009 + rank
    return wds.DataPipeline(
        wds.SimpleShardList(split_by_rank(shuffled_shards(urls, seed, epoch), rank, world_size)),
        split_by_worker,
        wds.tarfile_to_samples(handler=functools.partial(count_shard_error, skipped)),
        wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 100), seed=worker_seed),
        functools.partial(
            decode_samples, skipped=skipped, transform=transform, max_pixels=cfg.max_image_pixels
        ),
        functools.partial(
            batch_samples, skipped=skipped, tokenize=tokenize, batch_size=cfg.batch_size_per_rank
        ),
    )


class TrainBatches:
    """An endless stream of this rank's batches, epoch after epoch, with its epoch counter."""

    def __init__(
        self,
        cfg: DataConfig,
        transform: Transform,
        tokenize: Tokenizer,
        *,
        seed: int,
        rank: int,
        world_size: int,
        start_epoch: int = 0,
    ) -> None:
        self.cfg = cfg
        self.urls = expand_urls(cfg.train_shards)
        if len(self.urls) < world_size:
            raise ValueError(
                f"data.train_shards has {len(self.urls)} shards for {world_size} ranks: "
                "each rank needs at least one shard (more shards, or fewer processes)"
            )
        self.transform, self.tokenize = transform, tokenize
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = start_epoch

    def _loader(self) -> DataLoader:
        pipeline = epoch_pipeline(
            self.cfg,
            self.urls,
            self.transform,
            self.tokenize,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
        )
        workers = self.cfg.workers
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=False,
        )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            produced = 0
            for batch in self._loader():
                produced += 1
                yield batch
            if produced == 0:
                raise RuntimeError(
                    f"rank {self.rank}: epoch {self.epoch} produced no full batch of "
                    f"{self.cfg.batch_size_per_rank} from {len(self.urls)} shards; "
                    "check data.train_shards, or lower data.batch_size_per_rank"
                )
            log.info("rank %d finished data epoch %d (%d batches)", self.rank, self.epoch, produced)
            self.epoch += 1
