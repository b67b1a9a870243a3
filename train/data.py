"""The training data pipeline: per-worker sample streams that resume exactly where they stopped.

Per epoch, for each source: shard list -> shuffle (seed, epoch) -> split by rank -> split by
worker (or, resampled: shards drawn with replacement) -> tar -> raw samples. Then, per worker:
sources interleaved by weight -> shuffle buffer (those stages: train/sampling.py) -> [replay:
skip what was delivered before a resume] -> decode + augment (bad samples skipped and counted)
-> batch + tokenize.

Every random choice (shard order, shard draws, source draws, the shuffle buffer, each sample's
augmentation) comes from a generator seeded by (seed, epoch, rank, worker[, position]), so a
worker's stream is a function of those alone. The rank's `DataPosition` records how many raw
samples each worker had delivered; a resumed worker replays its raw samples up to there
without decoding them, and every batch after the resume point is the one the uninterrupted run
would have made. Each batch carries the counts its worker skipped since its previous batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.model import cut_text_padding
from common.preprocess import ResizeLimit, Tokenizer, Transform, decode_or_skip
from common.shards import SampleError, count_samples, expand_urls, shard_sizes, to_raw_sample
from train.config import DataConfig, HardNegativesConfig
from train.hard_negatives import sample_negatives
from train.sampling import (
    Reader,
    Source,
    data_sources,
    derived_seed,
    skip_delivered,
    worker_samples,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Batch:
    images: torch.Tensor  # [B, 3, H, W]
    tokens: torch.Tensor  # [B, L]
    skipped: dict[str, int]
    """Samples (and shards) skipped, by reason, since the previous batch of this rank."""
    worker: int = 0
    """The (logical) worker that made it."""
    consumed: int = 0
    """Raw samples that worker had taken from its shuffled stream once this batch was full."""
    ids: torch.Tensor | None = None
    """[B] each sample's place in the training set (`TrainBatches(sample_ids=True)`): its shard's
    offset plus its place in the shard; -1 where unknown. None unless asked for."""
    negative_tokens: torch.Tensor | None = None
    """[B, K, L] each sample's hard-negative captions, padded to K (`TrainBatches(hard_negatives=
    ...)`); None unless asked for."""
    negative_mask: torch.Tensor | None = None
    """[B, K] bool: which of negative_tokens are real, not padding."""

    def cut_text_padding(self, pooling: tuple[str, int | None]) -> None:
        """Captions and negatives cut to one shorter length where that is exact for a text
        tower pooling so (`common.model.cut_text_padding`)."""
        if self.negative_tokens is None:
            (self.tokens,) = cut_text_padding(pooling, self.tokens)
        else:
            self.tokens, self.negative_tokens = cut_text_padding(
                pooling, self.tokens, self.negative_tokens
            )


@dataclass(slots=True)
class WorkerEnd:
    """A worker's stream for the epoch is over: its final position and its last skip counts."""

    worker: int
    consumed: int
    skipped: dict[str, int]


@dataclass(slots=True)
class DataPosition:
    """Where a rank's stream stands; a checkpoint of it resumes the stream exactly."""

    epoch: int = 0
    batches: int = 0
    """Batches this rank delivered in the epoch."""
    next_worker: int = 0
    """The logical worker whose item comes next (the DataLoader takes workers round robin)."""
    consumed: list[int] = field(default_factory=list)
    """Per logical worker: raw samples taken from its shuffled stream."""
    worker_batches: list[int] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)
    """Per logical worker: its stream for the epoch has ended."""

    @classmethod
    def start_of(cls, epoch: int, workers: int) -> DataPosition:
        return cls(epoch, 0, 0, [0] * workers, [0] * workers, [False] * workers)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's and Python's global RNGs seeded for one sample, restored afterwards: open_clip's
    random transforms draw from them, and a training process (workers=0) must not notice."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed costs ~1 ms
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


def sample_id(sample: dict[str, Any], offsets: dict[str, tuple[int, int]] | None) -> int:
    """The sample's place in the training set, from offsets {url: (first id, samples)}; -1 if
    unknown (no offsets, or a shard holding more samples than its count says)."""
    if offsets is None or sample.get("__url__") not in offsets:
        return -1
    first, count = offsets[sample["__url__"]]
    index = int(sample.get("__index__", count))
    return first + index if index < count else -1


def decode_samples(
    src: Iterable[tuple[int, dict[str, Any]]],
    skipped: Counter[str],
    transform: Transform,
    resize: ResizeLimit,
    max_pixels: int,
    reader: Reader,
    offsets: dict[str, tuple[int, int]] | None = None,
    hard_negatives: HardNegativesConfig | None = None,
) -> Iterator[tuple[torch.Tensor, str, int, list[str]]]:
    """(position, raw sample) -> (augmented image, caption, sample id, hard negatives); bad
    samples skipped and counted (common.preprocess.decode_or_skip: the service's bounds, `resize`
    the model's). Sample ids come from `offsets` (see `sample_id`), hard negatives from the
    sample's JSON or the generator as `hard_negatives` says (none: []).

    The augmentation (and the choice of negatives) of the sample at `position` is seeded by
    (seed, epoch, rank, worker, position), so it is the same whichever run (first or resumed)
    makes it.
    """
    for position, sample in src:
        try:
            raw = to_raw_sample(sample)
        except SampleError as exc:
            skipped[exc.reason] += 1
            log.debug("skipped: %s", exc)
            continue
        image = decode_or_skip(
            raw.image, skipped, key=raw.key, resize=resize, max_pixels=max_pixels
        )
        if image is None:
            continue
        seed = reader.sample_seed(position)
        with seeded(seed):
            image_tensor = transform(image)
        negatives = []
        if hard_negatives is not None:
            negatives = sample_negatives(raw.caption, raw.meta, hard_negatives, seed)
        yield image_tensor, raw.caption, sample_id(sample, offsets), negatives


class EpochData(IterableDataset):
    """One epoch of a rank's data: DataLoader worker i plays logical worker (i + rotation) % W.

    The rotation makes the worker whose batch is due next come first after a resume, so the
    DataLoader's round robin continues the order of the interrupted run.
    """

    def __init__(
        self,
        cfg: DataConfig,
        sources: list[Source],
        transform: Transform,
        tokenize: Tokenizer,
        resize: ResizeLimit,
        *,
        seed: int,
        rank: int,
        world_size: int,
        position: DataPosition,
        batch_quota: list[int] | None,
        offsets: dict[str, tuple[int, int]] | None = None,
        hard_negatives: HardNegativesConfig | None = None,
        text_pooling: tuple[str, int | None] | None = None,
    ) -> None:
        self.cfg, self.sources, self.offsets = cfg, sources, offsets
        self.hard_negatives, self.text_pooling = hard_negatives, text_pooling
        self.transform, self.tokenize, self.resize = transform, tokenize, resize
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = position
        self.batch_quota = batch_quota  # resampled: batches per logical worker in the epoch

    def __iter__(self) -> Iterator[Batch | WorkerEnd]:
        info = get_worker_info()
        loader_worker = 0 if info is None else info.id
        workers = len(self.position.consumed)
        worker = (loader_worker + self.position.next_worker) % workers
        if self.position.done[worker]:
            return
        reader = Reader(self.seed, self.position.epoch, self.rank, self.world_size, worker, workers)
        yield from self.worker_stream(reader)

    def worker_stream(self, reader: Reader) -> Iterator[Batch | WorkerEnd]:
        """Batches of one logical worker from its recorded position, then its WorkerEnd."""
        w, size = reader.worker, self.cfg.batch_size_per_rank
        skipped: Counter[str] = Counter()
        cursor = [self.position.consumed[w]]  # raw samples taken so far
        raw = worker_samples(self.cfg, self.sources, reader, skipped)
        samples = skip_delivered(raw, cursor[0], skipped)
        decoded = decode_samples(
            _tracked(samples, cursor),
            skipped,
            self.transform,
            self.resize,
            self.cfg.max_image_pixels,
            reader,
            self.offsets,
            self.hard_negatives,
        )
        quota = self.batch_quota
        batches_left = None if quota is None else quota[w] - self.position.worker_batches[w]
        while batches_left is None or batches_left > 0:
            chunk = list(itertools.islice(decoded, size))
            if len(chunk) < size:  # only full batches: a partial one would differ across ranks
                break
            images, captions, ids, negatives = zip(*chunk, strict=True)
            delta = dict(skipped)
            skipped.clear()
            batch = Batch(
                torch.stack(images),
                self.tokenize(list(captions)),
                delta,
                w,
                cursor[0],
                None if self.offsets is None else torch.tensor(ids, dtype=torch.int64),
            )
            if self.hard_negatives is not None:
                batch.negative_tokens, batch.negative_mask = self._negatives(negatives)
            if self.text_pooling is not None:
                batch.cut_text_padding(self.text_pooling)
            yield batch
            batches_left = None if batches_left is None else batches_left - 1
        yield WorkerEnd(w, cursor[0], dict(skipped))

    def _negatives(self, per_sample: tuple[list[str], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, K, L] of each sample's negatives, padded to K with empty captions, and
        the mask [B, K] of the real ones: the same shapes every step, whatever each sample has."""
        assert self.hard_negatives is not None
        k = self.hard_negatives.max_per_sample
        padded = [row[j] if j < len(row) else "" for row in per_sample for j in range(k)]
        mask = torch.tensor([[j < len(row) for j in range(k)] for row in per_sample])
        return self.tokenize(padded).unflatten(0, (len(per_sample), k)), mask


def check_eval_paths(cfg: DataConfig) -> None:
    """Fail before the first step if the evaluation's local inputs are missing, rather than at
    the final evaluation, hours later. FileNotFoundError naming the field."""
    hint = "set it to '' to skip that evaluation"
    if not cfg.val_shards:
        return  # no evaluation at all: zeroshot_file, which labels val images, is unused
    try:
        expand_urls(cfg.val_shards)
    except (FileNotFoundError, ValueError) as exc:
        raise FileNotFoundError(f"data.val_shards: {exc}; {hint}") from None
    if cfg.zeroshot_file and not os.path.isfile(cfg.zeroshot_file):
        raise FileNotFoundError(f"data.zeroshot_file: {cfg.zeroshot_file!r} not found; {hint}")


def _tracked(src: Iterable[tuple[int, T]], cursor: list[int]) -> Iterator[tuple[int, T]]:
    """Pass (position, item) on, keeping cursor[0] = items taken, for the batch's position."""
    for position, item in src:
        cursor[0] = position + 1
        yield position, item


WORKER_STOP_GRACE_S = 120
"""How long a data worker outlives a scheduler's SIGTERM: longer than the rank needs to finish
its step and save (after the scheduler's grace period, SIGKILL ends everything anyway)."""


def _init_worker(niceness: int, worker_id: int) -> None:
    """DataLoader `worker_init_fn`: raise this worker's niceness (`data.worker_niceness`), and
    let it outlive a scheduler's stop signal."""
    if niceness:
        os.nice(niceness)
    _outlive_stop_signals()


def _outlive_stop_signals() -> None:
    """Keep serving batches after SIGTERM / SIGUSR1 from anyone but the rank itself.

    torchrun passes a SIGTERM on to each rank's whole process group, SLURM to every process:
    the workers get it with their rank. A worker that died of it would fail the batch its rank
    is waiting for, and the rank its last step, instead of finishing the step and saving
    (train/preemption.py). Python's handlers cannot see who sent a signal, so the signals are
    blocked and a thread takes them with their sender: the rank's own SIGTERM (the DataLoader
    ending a worker) exits at once, as torch's handler does; another's sets an alarm that ends
    the worker after WORKER_STOP_GRACE_S, should its rank not have ended it by then.
    """
    stops = {signal.SIGTERM, signal.SIGUSR1}
    # the alarm below must end the worker: a handler inherited from the parent (a test runner's
    # per-test timeout, say) would run in the worker instead
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # before any other thread of the worker
    threading.Thread(target=_take_stop_signals, args=(stops,), daemon=True).start()


def _take_stop_signals(stops: set[signal.Signals]) -> None:
    while True:
        info = signal.sigwaitinfo(stops)
        if info.si_signo != signal.SIGTERM:
            continue  # SLURM's early warning: nothing to do here
        if info.si_pid == os.getppid():
            os._exit(0)
        signal.alarm(WORKER_STOP_GRACE_S)  # SIGALRM's default action ends the process


PREFETCH_BATCHES = 4
"""Batches each DataLoader worker makes ahead of the trainer (the DataLoader's prefetch_factor)."""


class TrainBatches:
    """An endless stream of this rank's batches, epoch after epoch, resumable from `state_dict`."""

    def __init__(
        self,
        cfg: DataConfig,
        transform: Transform,
        tokenize: Tokenizer,
        resize: ResizeLimit,
        *,
        seed: int,
        rank: int,
        world_size: int,
        start_epoch: int = 0,
        state: dict[str, Any] | None = None,
        pin_memory: bool = False,
        sample_ids: bool = False,
        hard_negatives: HardNegativesConfig | None = None,
        text_pooling: tuple[str, int | None] | None = None,
    ) -> None:
        """resize: the model's bound on an image's resized pixels (samples over it are skipped).
        sample_ids: give each batch its samples' ids (`Batch.ids`), from the shards' sample
        counts (local shards only); `num_samples` is then the number of ids. hard_negatives:
        give each batch its samples' hard-negative captions (`Batch.negative_tokens`).
        text_pooling: the text tower's (`common.model.text_pooling`); each batch's tokens are
        then cut to the length its texts need (`Batch.cut_text_padding`)."""
        self.cfg, self.hard_negatives, self.text_pooling = cfg, hard_negatives, text_pooling
        self.pin_memory = pin_memory  # page-locked batches: asynchronous copies to a GPU
        self.sources = data_sources(cfg)
        if not cfg.resampled:
            for source in self.sources:
                if len(source.urls) < world_size:
                    raise ValueError(
                        f"data.train_shards: {source.spec!r} has {len(source.urls)} shards for "
                        f"{world_size} ranks: in epoch mode each rank needs at least one shard "
                        "of every source (more shards, fewer processes, or data.resampled=true)"
                    )
        self.transform, self.tokenize, self.resize = transform, tokenize, resize
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(1, cfg.workers)  # logical workers; workers=0 reads in this process
        self.samples_per_epoch, counted_from = self._samples_per_epoch()
        global_batch = cfg.batch_size_per_rank * world_size
        self.steps_per_epoch = (
            None if self.samples_per_epoch is None else self.samples_per_epoch // global_batch
        )
        if cfg.resampled and not self.steps_per_epoch:
            raise ValueError(
                f"data.samples_per_epoch ({self.samples_per_epoch}) is less than one global batch "
                f"({global_batch}): resampled epochs need at least one step"
            )
        self.offsets = self._sample_offsets() if sample_ids else None
        self.position = DataPosition.start_of(start_epoch, self.workers)
        if state is not None:
            self.load_state_dict(state)
        self._log_plan(counted_from, global_batch)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def num_samples(self) -> int:
        """Sample ids run from 0 to this (with sample_ids=True)."""
        return sum(count for _, count in (self.offsets or {}).values())

    def _sample_offsets(self) -> dict[str, tuple[int, int]]:
        """{shard url: (its first sample id, its sample count)}, in the sources' order."""
        urls = list(dict.fromkeys(url for source in self.sources for url in source.urls))
        sizes = shard_sizes(urls)
        if sizes is None:
            raise ValueError(
                "loss.negatives=global keeps a state per training sample, which needs every "
                "shard's sample count: it works with local shards only (sizes.json, "
                "img2dataset's *_stats.json or a scan of the tars)"
            )
        offsets, first = {}, 0
        for url, count in zip(urls, sizes, strict=True):
            offsets[url] = (first, count)
            first += count
        return offsets

    def _samples_per_epoch(self) -> tuple[int | None, str]:
        if self.cfg.samples_per_epoch:
            return self.cfg.samples_per_epoch, "data.samples_per_epoch"
        found = count_samples([url for source in self.sources for url in source.urls])
        if found is None and self.cfg.resampled:
            raise ValueError(
                "data.resampled=true with remote shards needs data.samples_per_epoch "
                "(the sample count cannot be read from pipe: or network URLs)"
            )
        return (None, "unknown: remote shards") if found is None else (found.samples, found.method)

    def _log_plan(self, counted_from: str, global_batch: int) -> None:
        sources = "; ".join(
            f"{s.spec} ({len(s.urls)} shards, weight {s.weight:g})" for s in self.sources
        )
        mode = "resampled (shards drawn with replacement)" if self.cfg.resampled else "epoch"
        steps = "?" if self.steps_per_epoch is None else self.steps_per_epoch
        approx = "" if self.cfg.resampled else "~"
        log.info(
            "data: %s; %s mode; %s samples per epoch (%s); %s%s steps per epoch at global batch %d",
            sources,
            mode,
            self.samples_per_epoch if self.samples_per_epoch is not None else "?",
            counted_from,
            approx,
            steps,
            global_batch,
        )

    def _fingerprint(self) -> dict[str, Any]:
        """What fixes the raw sample order: a position means nothing if any of it changed."""
        cfg = self.cfg
        return {
            "train_shards": cfg.train_shards,
            "train_weights": list(cfg.train_weights),
            "resampled": cfg.resampled,
            "samples_per_epoch": self.samples_per_epoch,
            "batch_size_per_rank": cfg.batch_size_per_rank,
            "shuffle_buffer": cfg.shuffle_buffer,
            "workers": self.workers,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"position": dataclasses.asdict(self.position), "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position; if the data setup changed, at the next epoch."""
        position = DataPosition(**state["position"])
        changed = {k: v for k, v in self._fingerprint().items() if state["fingerprint"].get(k) != v}
        if changed:
            log.warning(
                "rank %d: the data setup changed since the checkpoint (%s): the stream restarts "
                "at data epoch %d instead of resuming inside epoch %d",
                self.rank,
                ", ".join(sorted(changed)),
                position.epoch + 1,
                position.epoch,
            )
            position = DataPosition.start_of(position.epoch + 1, self.workers)
        self.position = position

    def _batch_quota(self) -> list[int] | None:
        """Resampled: the epoch's steps, split over the logical workers; epoch mode: None."""
        if not self.cfg.resampled:
            return None
        assert self.steps_per_epoch is not None
        share, extra = divmod(self.steps_per_epoch, self.workers)
        return [share + (worker < extra) for worker in range(self.workers)]

    def _next_epoch_due(self, pos: DataPosition) -> bool:
        """Whether to start the next epoch's workers now: this epoch's last batches are in flight.

        A new DataLoader's workers take a while to start, fill their shuffle buffers and make a
        first batch. Started while the trainer works through the batches the current workers
        already made, they do that (niced, on idle cycles) before the epoch ends, rather than
        stalling the first step of the next. Not with data.workers=0, nor when the epoch's length
        is unknown (remote shards, epoch mode).
        """
        if not self.cfg.workers or self.steps_per_epoch is None:
            return False
        in_flight = (PREFETCH_BATCHES + 1) * self.cfg.workers
        return pos.batches >= max(1, self.steps_per_epoch - in_flight)

    def _loader(self, position: DataPosition) -> DataLoader:
        dataset = EpochData(
            self.cfg,
            self.sources,
            self.transform,
            self.tokenize,
            self.resize,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            position=DataPosition(**dataclasses.asdict(position)),  # a snapshot
            batch_quota=self._batch_quota(),
            offsets=self.offsets,
            hard_negatives=self.hard_negatives,
            text_pooling=self.text_pooling,
        )
        workers = self.cfg.workers
        niceness = self.cfg.worker_niceness
        init = functools.partial(_init_worker, niceness) if workers else None
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=PREFETCH_BATCHES if workers else None,
            worker_init_fn=init,
            pin_memory=self.pin_memory,
            # its own generator: making worker seeds must not draw from the global RNG
            generator=torch.Generator().manual_seed(
                derived_seed(self.seed, position.epoch, self.rank)
            ),
        )

    def __iter__(self) -> Iterator[Batch]:
        pending: Counter[str] = Counter()  # skips reported by WorkerEnds, for the next batch
        upcoming: Iterator[Batch | WorkerEnd] | None = None  # the next epoch's, started early
        while True:
            pos = self.position
            if pos.batches == 0 and not any(pos.consumed):
                log.info("rank %d: data epoch %d begins", self.rank, pos.epoch)
            else:
                log.info(
                    "rank %d: data epoch %d resumes after batch %d (raw samples replayed "
                    "undecoded: %d)",
                    self.rank,
                    pos.epoch,
                    pos.batches,
                    sum(pos.consumed),
                )
            items = upcoming if upcoming is not None else iter(self._loader(pos))
            upcoming = None
            for item in items:
                pos.next_worker = (item.worker + 1) % self.workers
                pos.consumed[item.worker] = item.consumed
                pending.update(item.skipped)
                if isinstance(item, WorkerEnd):
                    pos.done[item.worker] = True
                    continue
                pos.worker_batches[item.worker] += 1
                pos.batches += 1
                item.skipped = dict(pending)
                pending.clear()
                if upcoming is None and self._next_epoch_due(pos):
                    following = DataPosition.start_of(pos.epoch + 1, self.workers)
                    upcoming = iter(self._loader(following))
                yield item
            if pos.batches == 0:
                raise RuntimeError(
                    f"rank {self.rank}: epoch {pos.epoch} produced no full batch of "
                    f"{self.cfg.batch_size_per_rank} from {sum(len(s.urls) for s in self.sources)}"
                    " shards; check data.train_shards, or lower data.batch_size_per_rank"
                )
            log.info(
                "rank %d finished data epoch %d (%d batches, %d raw samples read)",
                self.rank,
                pos.epoch,
                pos.batches,
                sum(pos.consumed),
            )
            self.position = DataPosition.start_of(pos.epoch + 1, self.workers)
