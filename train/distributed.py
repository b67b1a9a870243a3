"""Process group set-up, feature gathering with gradient, and DDP / FSDP wrapping."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

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


def wrap_model(
    model: nn.Module, info: DistInfo, *, parallel: str = "ddp", static_graph: bool = False
) -> nn.Module:
    """DDP or FSDP for several processes; the model itself for one.

    DDP gets no device_ids on CPU, where it must not be given any. FSDP (`shard_model`) shards
    `model` in place and returns it: build the optimizer after this call, over its parameters.
    """
    if not info.enabled:
        return model
    if parallel == "fsdp":
        return shard_model(model)
    if parallel != "ddp":
        raise ValueError(f"compute.parallel: unknown parallelism {parallel!r}")
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, static_graph=static_graph)


_SHARD_UNITS = (ResidualAttentionBlock, CustomResidualAttentionBlock)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: each transformer block is a unit (gathered for its own forward and backward only),
    the rest of the model the root unit.

    fully_shard cannot shard 0-d parameters (the temperature, SigLIP's bias): they stay whole on
    every rank, and `sync_replicated_grads` averages their gradients after backward.
    """
    for module in model.modules():
        if isinstance(module, _SHARD_UNITS):
            fully_shard(module)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    fully_shard(model, ignored_params=scalars)
    # evaluation calls the encoders directly: they gather the root unit's weights like forward
    for method in ("encode_image", "encode_text"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded by `shard_model`: its state is spread over the ranks."""
    return isinstance(model, FSDPModule)


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and optimizer's state, whole, for a checkpoint.

    Sharded: a collective that every rank must call; rank 0 gets whole CPU tensors (the model's
    keys are the unsharded model's; the optimizer's state is keyed by parameter name), the
    others empty dicts. Otherwise the plain state dicts.
    """
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    return full_model_state(model), get_optimizer_state_dict(model, optimizer, options=_WHOLE)


_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """The model's state with whole tensors (a collective when sharded: rank 0 gets it)."""
    return get_model_state_dict(model, options=_WHOLE) if is_sharded(model) else model.state_dict()


def load_full_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load whole weights (each rank keeps its own shards when sharded)."""
    if is_sharded(model):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def load_full_state_dicts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
) -> None:
    """Load what `full_state_dicts` gave (each rank keeps its own shards when sharded)."""
    load_full_model_state(model, model_state)
    if is_sharded(model):
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    else:
        optimizer.load_state_dict(optimizer_state)


def unwrap(model: nn.Module) -> nn.Module:
    """The module DDP wraps (FSDP shards in place: the model is its own module)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes inside reduce gradients over ranks only if `enabled`.

    With several backward passes per step (GradCache chunks, accumulation) only the last one
    needs to all-reduce (DDP) or reduce-scatter (FSDP) the accumulated gradients.
    """
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def sync_replicated_grads(model: nn.Module, info: DistInfo) -> None:
    """Average over ranks the gradients FSDP leaves alone (its ignored, unsharded parameters).

    DDP reduces every gradient itself; with one process there is nothing to do.
    """
    if not (info.enabled and isinstance(model, FSDPModule)):
        return
    for param in model.parameters():
        if param.grad is not None and not isinstance(param.grad, DTensor):
            dist.all_reduce(param.grad)
            param.grad.div_(info.world_size)


# newer torch renamed all_gather_into_tensor (deprecated there, with a warning at every call)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
        _all_gather_single(out, x.contiguous())
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
    _all_gather_single(out, x.contiguous())
    return out
