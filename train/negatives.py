"""Negatives beyond the batch (loss.negatives): the state a step's loss needs besides the batch.

queue   MoCo (He et al. 2020): a momentum encoder, an EMA of the model, embeds each step's batch
        into keys; the last loss.queue_size image keys and text keys (of every rank, so each
        rank holds the same queue) are extra negatives for the next steps (`queue_clip_loss`).
global  SogCLR (Yuan et al. 2022) / FastCLIP (Wei et al. 2024): every training sample keeps a
        moving estimate u of its contrastive denominator over the whole dataset's negatives,
        updated each time the sample is in a batch (`global_contrastive_loss`). The estimates
        are sharded: rank r holds those of the samples whose id % world_size == r, and a step
        exchanges the batch's with two small collectives. A sample's id is its place in the
        training set (shard by shard, member by member: `TrainBatches(sample_ids=True)`).

Everything here is in the checkpoint (`state_dict`, a collective), so a resumed run continues
with the same keys, queue and estimates as the uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.model import DualEncoder
from train.compute import Precision
from train.config import LossConfig
from train.distributed import DistInfo, full_model_state, gather, load_full_model_state

log = logging.getLogger(__name__)


class MomentumEncoder:
    """A copy of the model that follows it as an EMA: p_k <- m p_k + (1 - m) p after each step.

    Buffers (batch-norm statistics) are copied, not averaged. Keys come from a forward without
    graph, in the model's own mode. Sharded models get a sharded copy (`shard`), updated shard
    by shard.
    """

    def __init__(
        self,
        model: DualEncoder,
        momentum: float,
        shard: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.momentum = momentum
        self.model: DualEncoder = copy.deepcopy(model)
        self.model.requires_grad_(False)
        if shard is not None:
            self.model = shard(self.model)  # type: ignore[assignment]

    @torch.no_grad()
    def keys(
        self, images: Tensor, tokens: Tensor, precision: Precision, chunk: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Float32 image and text keys [n, D] of the rank's batch, `chunk` samples at a time."""
        chunk = chunk or images.shape[0]
        image_keys, text_keys = [], []
        with precision.autocast():
            for start in range(0, images.shape[0], chunk):
                part = slice(start, start + chunk)
                image_part, text_part, _, _ = self.model(images[part], tokens[part])
                image_keys.append(image_part.float())
                text_keys.append(text_part.float())
        return torch.cat(image_keys), torch.cat(text_keys)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step toward `model` (the online model, wrapped the same way as the copy)."""
        keys: list[Tensor] = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(keys) != len(params):
            raise ValueError(f"the key encoder has {len(keys)} parameters, the model {len(params)}")
        torch._foreach_lerp_(keys, params, 1.0 - self.momentum)  # one kernel, not one per tensor
        for key_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            key_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, Any]:
        """Whole tensors (a collective when sharded: rank 0 gets them)."""
        return full_model_state(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_full_model_state(self.model, state)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Start over as a copy of `model` (e.g. a resumed run whose checkpoint has no keys)."""
        for key_param, param in zip(self.model.parameters(), model.parameters(), strict=True):
            key_param.copy_(param.detach())


class FeatureQueue:
    """The last `size` image and text keys, a ring buffer (the order of negatives is moot)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device
        self.images = self.texts = torch.empty(0, 0, device=device)
        self.filled = self.next = 0

    def columns(self) -> tuple[Tensor, Tensor]:
        """(image keys, text keys) [filled, D]: empty until the first push."""
        return self.images[: self.filled], self.texts[: self.filled]

    @torch.no_grad()
    def push(self, images: Tensor, texts: Tensor) -> None:
        """Enqueue a step's keys [M, D] (the same on every rank), dropping the oldest."""
        if self.images.numel() == 0:
            self.images = images.new_zeros(self.size, images.shape[1])
            self.texts = texts.new_zeros(self.size, texts.shape[1])
        images, texts = images[-self.size :], texts[-self.size :]
        slots = (self.next + torch.arange(images.shape[0], device=images.device)) % self.size
        self.images[slots] = images
        self.texts[slots] = texts
        self.next = (self.next + images.shape[0]) % self.size
        self.filled = min(self.size, self.filled + images.shape[0])

    def state_dict(self) -> dict[str, Any]:
        return {
            "images": self.images.cpu(),
            "texts": self.texts.cpu(),
            "filled": self.filled,
            "next": self.next,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["images"].numel() and state["images"].shape[0] != self.size:
            log.warning(
                "loss.queue_size changed (%d -> %d): the queue starts empty",
                state["images"].shape[0],
                self.size,
            )
            return
        self.images = state["images"].to(self.device)
        self.texts = state["texts"].to(self.device)
        self.filled, self.next = int(state["filled"]), int(state["next"])


class GlobalDenominators:
    """log u (image anchor, text anchor) of every training sample, sharded over the ranks.

    Unknown estimates are NaN: a sample's first visit starts its estimate at the batch's
    (`moving_log_average`). Ids < 0 (a sample whose place in the set is unknown) never get one.
    """

    def __init__(self, num_samples: int, info: DistInfo) -> None:
        self.num_samples, self.info = num_samples, info
        owned = len(range(info.rank, num_samples, info.world_size))
        self.log_u = torch.full((owned, 2), float("nan"), device=info.device)

    def _mine(self, ids: Tensor) -> Tensor:
        known = (ids >= 0) & (ids < self.num_samples)
        return known & (ids % self.info.world_size == self.info.rank)

    def lookup(self, ids: Tensor) -> Tensor:
        """[N, 2] estimates of the global batch's samples `ids` [N] (the same on every rank)."""
        mine = self._mine(ids)
        found = torch.zeros(ids.shape[0], 2, device=self.log_u.device)
        found[mine] = self.log_u[ids[mine] // self.info.world_size]
        if self.info.enabled:  # each id has one owner, the others add 0 (NaN stays NaN)
            dist.all_reduce(found)
        unknown = (ids < 0) | (ids >= self.num_samples)
        found[unknown] = float("nan")
        return found

    def store(self, ids: Tensor, log_u: Tensor) -> None:
        """Keep the owned ones of the global batch's new estimates [N, 2]."""
        mine = self._mine(ids)
        self.log_u[ids[mine] // self.info.world_size] = log_u[mine].to(self.log_u.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The whole table [num_samples, 2] on rank 0 (a collective); {} on the others."""
        shards: list[Tensor] = [self.log_u.cpu()]
        if self.info.enabled:
            shards = [torch.empty(0)] * self.info.world_size if self.info.is_main else []
            dist.gather_object(self.log_u.cpu(), shards if self.info.is_main else None, dst=0)
        if not self.info.is_main:
            return {}
        table = torch.full((self.num_samples, 2), float("nan"))
        for rank, shard in enumerate(shards):
            table[rank :: len(shards)] = shard
        return {"log_u": table}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        table = state["log_u"]
        if table.shape[0] != self.num_samples:
            log.warning(
                "the training set has %d samples, the checkpoint's estimates %d: the global "
                "denominators start over",
                self.num_samples,
                table.shape[0],
            )
            return
        self.log_u = table[self.info.rank :: self.info.world_size].to(self.info.device)

    @property
    def known(self) -> int:
        """Samples of this rank's shard that have an estimate."""
        return int((~torch.isnan(self.log_u[:, 0])).sum())


@dataclass(slots=True)
class StepNegatives:
    """What one step's loss takes besides the batch (given to `train.objective.StepLoss`)."""

    queue_images: Tensor | None = None
    """negatives=queue: the queue's image and text keys [K, D], the same on every rank."""
    queue_texts: Tensor | None = None
    key_images: Tensor | None = None
    """negatives=queue with a key encoder: this rank's batch's keys [n, D]."""
    key_texts: Tensor | None = None
    ids: Tensor | None = None
    """negatives=global: this rank's batch's sample ids [n]."""
    denominators: GlobalDenominators | None = None
    collected: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    """negatives=queue without a key encoder: the gathered features the loss saw, to enqueue."""

    def part(self, index: int, parts: int) -> StepNegatives:
        """The same for micro-batch `index` of `parts` (accumulation); `collected` is the same
        list (a shallow copy), so the micro-batches' features all reach the queue."""

        def chunk(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.chunk(parts)[index]

        return dataclasses.replace(
            self,
            key_images=chunk(self.key_images),
            key_texts=chunk(self.key_texts),
            ids=chunk(self.ids),
        )


class Negatives:
    """The run's state for loss.negatives (nothing for `batch`): before and after each step."""

    def __init__(
        self,
        cfg: LossConfig,
        model: DualEncoder,
        info: DistInfo,
        *,
        shard: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        """Build before the model is wrapped (`shard`: how a sharded model's copy is sharded)."""
        self.cfg, self.info = cfg, info
        self.momentum: MomentumEncoder | None = None
        self.queue: FeatureQueue | None = None
        self.denominators: GlobalDenominators | None = None
        self.current: StepNegatives | None = None
        if cfg.negatives == "queue":
            self.queue = FeatureQueue(cfg.queue_size, info.device)
            if cfg.queue_momentum > 0:
                self.momentum = MomentumEncoder(model, cfg.queue_momentum, shard)

    @property
    def enabled(self) -> bool:
        return self.cfg.negatives != "batch"

    def set_num_samples(self, num_samples: int) -> None:
        """negatives=global: the training set's size (sample ids are 0..num_samples - 1)."""
        if self.cfg.negatives == "global":
            self.denominators = GlobalDenominators(num_samples, self.info)

    def before_step(
        self, images: Tensor, tokens: Tensor, ids: Tensor | None, precision: Precision, chunk: int
    ) -> StepNegatives | None:
        """The step's `StepNegatives`: the queue as it stands, the batch's keys or ids."""
        if not self.enabled:
            return None
        step = StepNegatives(denominators=self.denominators)
        if self.queue is not None:
            step.queue_images, step.queue_texts = self.queue.columns()
        if self.momentum is not None:
            step.key_images, step.key_texts = self.momentum.keys(images, tokens, precision, chunk)
        if self.denominators is not None:
            if ids is None:
                raise ValueError("loss.negatives=global needs the batches' sample ids")
            step.ids = ids.to(images.device)
        self.current = step
        return step

    def after_step(self, model: nn.Module, applied: bool) -> None:
        """After the optimizer step (`applied`; a skipped step changes nothing): the key encoder
        follows `model`, and the step's keys join the queue."""
        step, self.current = self.current, None
        if step is None or not applied or self.queue is None:
            return
        if self.momentum is not None:
            assert step.key_images is not None and step.key_texts is not None
            self.momentum.update(model)
            self.queue.push(gather(step.key_images, self.info), gather(step.key_texts, self.info))
        elif step.collected:
            self.queue.push(*(torch.cat(side) for side in zip(*step.collected, strict=True)))

    def stats(self) -> dict[str, float]:
        """For the metrics (every rank calls it): keys queued, samples with an estimate."""
        out: dict[str, float] = {}
        if self.queue is not None:
            out["queue_keys"] = self.queue.filled
        if self.denominators is not None:
            known = torch.tensor(self.denominators.known, device=self.info.device)
            if self.info.enabled:
                dist.all_reduce(known)
            out["global_estimates"] = int(known)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every rank calls it (the key encoder and the estimates are gathered to rank 0)."""
        state: dict[str, Any] = {"negatives": self.cfg.negatives}
        if self.momentum is not None:
            state["momentum"] = self.momentum.state_dict()
        if self.queue is not None:
            state["queue"] = self.queue.state_dict()
        if self.denominators is not None:
            state["global"] = self.denominators.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any] | None, model: nn.Module) -> None:
        """Restore (all ranks); `model`, restored already, seeds a key encoder without state."""
        if not self.enabled:
            return
        if not state or state.get("negatives") != self.cfg.negatives:
            log.warning(
                "the checkpoint has no state for loss.negatives=%s: it starts fresh (the key "
                "encoder as a copy of the restored model)",
                self.cfg.negatives,
            )
            if self.momentum is not None:
                self.momentum.copy_from(model)
            return
        for name, part in (
            ("momentum", self.momentum),
            ("queue", self.queue),
            ("global", self.denominators),
        ):
            if part is not None and name in state:
                part.load_state_dict(state[name])
