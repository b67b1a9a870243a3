"""Process group set-up, feature gathering with gradient, and DDP wrapping."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train.config import LossConfig
from train.loss import caption_labels, rank_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group (nccl on GPU, gloo on CPU), or run as one process.

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; `python -m train` sets none of
    them and gets world size 1 without a process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
        )
    return DistInfo(rank, world_size, local_rank, torch_device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP for several processes (no device_ids on CPU, where DDP must not be given any)."""
    if not info.enabled:
        return model
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each slice (all-reduce + slice).

    Rank r's loss depends on every rank's features (its rows meet all columns), so the gradient
    for rank r's features is the sum over ranks of what each rank's loss sends to that slice.
    A plain all_gather has no backward: the other ranks' terms would be lost.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [W*n, D]
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # [W*n, D] -> [n, D]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """[n, D] on each rank -> [W*n, D] in rank order, differentiable (see _GatherWithGrad)."""
    if not info.enabled:
        return x
    return _GatherWithGrad.apply(x)


def gather(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """[n, ...] on each rank -> [W*n, ...] in rank order, without gradient (e.g. token ids)."""
    if not info.enabled:
        return x
    out = x.new_empty((info.world_size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def contrastive_loss(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    info: DistInfo,
    cfg: LossConfig,
) -> torch.Tensor:
    """Forward both towers through (possibly DDP-wrapped) `model`; return this rank's loss.

    The loss of kind cfg.kind sees the gathered global batch and owns the rows of this rank's
    samples; multi_positive also gets the global batch's caption labels (equal token ids).
    """
    image_features, text_features, logit_scale, logit_bias = model(images, tokens)
    n = image_features.shape[0]
    labels = caption_labels(gather(tokens, info)) if cfg.kind == "multi_positive" else None
    return rank_loss(
        cfg,
        gather_with_grad(image_features, info),
        gather_with_grad(text_features, info),
        logit_scale,
        logit_bias,
        rows=slice(info.rank * n, (info.rank + 1) * n),
        labels=labels,
    )


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a (detached) scalar over ranks, e.g. the global loss for logging."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size
