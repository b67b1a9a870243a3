"""A step's forward and backward by one of three strategies: one pass, GradCache chunks, or
micro-batches.

Each takes the step's loss already built (`train.objective.StepLoss`: config, ranks and the
step's negatives bound), leaves this rank's share of the step's gradient in `.grad` (all-reduced
over ranks by the last backward, as DDP/FSDP do) and returns this rank's loss, detached. The
optimizer side (clipping, the finite check, the step) is the trainer's.

GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): the contrastive loss couples every sample to every other, but its dependence on the
towers goes only through the features [N, D]. So embed the batch chunk by chunk without a graph,
compute the loss and its gradient g with respect to the (few) features, then re-run each chunk
with its graph and back-propagate <features, g>: by the chain rule that is exactly the big-batch
gradient, with one chunk's activations in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from train.compute import Precision
from train.distributed import grad_sync, unwrap
from train.objective import Features, Inputs, StepLoss


def one_pass(
    model: nn.Module, inputs: Inputs, loss_fn: StepLoss, precision: Precision
) -> torch.Tensor:
    """The whole per-rank batch in one forward and one backward."""
    with precision.autocast():
        features = Features.of(model, inputs)
    loss = loss_fn(features, inputs)
    precision.scale(loss).backward()
    return loss.detach()


def accumulate(
    model: nn.Module, inputs: Inputs, loss_fn: StepLoss, precision: Precision, micro_batches: int
) -> torch.Tensor:
    """Mean of `micro_batches` separate losses, each over one micro-batch from every rank.

    Not the big-batch loss: a contrastive loss over a micro-batch sees only its negatives.
    """
    total = torch.zeros((), device=inputs.images.device)
    parts = inputs.chunk(micro_batches)
    for i, part in enumerate(parts):
        # DDP decides at forward time whether the coming backward all-reduces
        with grad_sync(model, i == len(parts) - 1):
            with precision.autocast():
                features = Features.of(model, part)
            loss = loss_fn.part(i, len(parts))(features, part)
            precision.scale(loss / len(parts)).backward()
        total += loss.detach()
    return total / len(parts)


class RngState:
    """The CPU and (on GPU) the device's random state at one point, to replay from it.

    GradCache runs each chunk twice; dropout, patch dropout and drop-path must draw the same
    masks both times, or the cached gradient belongs to a different function.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the global state afterwards is as before the block."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@contextlib.contextmanager
def _norm_stats_kept(model: nn.Module) -> Iterator[None]:
    """Undo batch-norm running-statistics updates made inside (GradCache's second forward).

    Each chunk's first forward already updated them once; the replay must not count it twice.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, saved, strict=True):
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


def _embed(
    model: nn.Module, chunks: list[Inputs], precision: Precision
) -> tuple[list[RngState], Features]:
    """GradCache's first pass: float32 features of all chunks, without a graph, and the random
    state each chunk's forward started from."""
    states, parts = [], []
    with torch.no_grad(), precision.autocast():
        for chunk in chunks:
            states.append(RngState(chunk.images.device))
            parts.append(Features.of(unwrap(model), chunk))
    return states, Features.cat(parts)


def grad_cache(
    model: nn.Module, inputs: Inputs, loss_fn: StepLoss, precision: Precision, chunk_size: int
) -> torch.Tensor:
    """The one-pass loss and gradient, computed chunk by chunk (see the module docstring).

    Equal to `one_pass` up to float rounding, given towers without batch statistics (a
    batch-norm tower normalises over each chunk, as it does over each rank under DDP).
    """
    chunks = inputs.split(chunk_size)
    # 1. embed without graph, remembering the random state each chunk started from
    states, features = _embed(model, chunks, precision)
    # 2. the exact loss over the global batch, and its gradient w.r.t. this rank's features
    # (the gather's backward adds what every rank's loss sends to them) and the temperature
    leaves = features.leaves()
    loss = loss_fn(features.from_leaves(leaves), inputs)
    cached = torch.autograd.grad(precision.scale(loss), leaves)  # d loss / d leaf, each leaf
    chunk_grads = features.split_grads(list(cached), chunk_size)
    # 3. re-embed each chunk with graph and push the cached gradients through it; only the
    # last backward reduces gradients over ranks, and it carries the temperature's (and bias's)
    with _norm_stats_kept(model):
        for i, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
            last = i == len(chunks) - 1
            with grad_sync(model, last):
                with state.replay(), precision.autocast():
                    part = Features.of(model, chunk)
                part.surrogate(chunk_grads[i], with_scale=last).backward()
    return loss.detach()


def forward_backward(
    model: nn.Module,
    inputs: Inputs,
    loss_fn: StepLoss,
    precision: Precision,
    *,
    grad_cache_chunk: int = 0,
    accum_steps: int = 1,
) -> torch.Tensor:
    """The step's gradient by the configured strategy (optim.grad_cache_chunk / accum_steps)."""
    if grad_cache_chunk:
        return grad_cache(model, inputs, loss_fn, precision, grad_cache_chunk)
    if accum_steps > 1:
        return accumulate(model, inputs, loss_fn, precision, accum_steps)
    return one_pass(model, inputs, loss_fn, precision)
