"""The forward and backward of one training step: one pass, GradCache chunks, or micro-batches.

Each function leaves this rank's share of the step's gradient in `.grad` (all-reduced over ranks
by the last backward, as DDP/FSDP do) and returns this rank's loss, detached. The optimizer side
(clipping, the finite check, the step) is the trainer's.

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
from train.config import LossConfig
from train.distributed import DistInfo, features_loss, grad_sync, unwrap


def one_pass(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    info: DistInfo,
    cfg: LossConfig,
    precision: Precision,
) -> torch.Tensor:
    """The whole per-rank batch in one forward and one backward."""
    with precision.autocast():
        image_features, text_features, logit_scale, logit_bias = model(images, tokens)
    loss = features_loss(image_features, text_features, logit_scale, logit_bias, tokens, info, cfg)
    precision.scale(loss).backward()
    return loss.detach()


def accumulate(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    info: DistInfo,
    cfg: LossConfig,
    precision: Precision,
    micro_batches: int,
) -> torch.Tensor:
    """Mean of `micro_batches` separate losses, each over one micro-batch from every rank.

    Not the big-batch loss: a contrastive loss over a micro-batch sees only its negatives.
    """
    total = torch.zeros((), device=images.device)
    parts = list(zip(images.chunk(micro_batches), tokens.chunk(micro_batches), strict=True))
    for i, (image_part, token_part) in enumerate(parts):
        # DDP decides at forward time whether the coming backward all-reduces
        with grad_sync(model, i == len(parts) - 1):
            with precision.autocast():
                image_features, text_features, scale, bias = model(image_part, token_part)
            loss = features_loss(image_features, text_features, scale, bias, token_part, info, cfg)
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


Chunk = tuple[torch.Tensor, torch.Tensor]  # images [c, 3, H, W], tokens [c, L]


def _embed(
    model: nn.Module, chunks: list[Chunk], precision: Precision
) -> tuple[list[RngState], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GradCache's first pass: float32 features [n, D] of all chunks, without a graph, and the
    random state each chunk's forward started from."""
    states, image_parts, text_parts = [], [], []
    with torch.no_grad(), precision.autocast():
        for image_chunk, token_chunk in chunks:
            states.append(RngState(image_chunk.device))
            image_part, text_part, logit_scale, logit_bias = unwrap(model)(image_chunk, token_chunk)
            image_parts.append(image_part.float())
            text_parts.append(text_part.float())
    return states, torch.cat(image_parts), torch.cat(text_parts), logit_scale, logit_bias


def grad_cache(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    info: DistInfo,
    cfg: LossConfig,
    precision: Precision,
    chunk_size: int,
) -> torch.Tensor:
    """The one-pass loss and gradient, computed chunk by chunk (see the module docstring).

    Equal to `one_pass` up to float rounding, given towers without batch statistics (a
    batch-norm tower normalises over each chunk, as it does over each rank under DDP).
    """
    chunks = list(zip(images.split(chunk_size), tokens.split(chunk_size), strict=True))
    # 1. embed without graph, remembering the random state each chunk started from
    states, image_features, text_features, logit_scale, logit_bias = _embed(
        model, chunks, precision
    )
    # 2. the exact loss over the global batch, and its gradient w.r.t. this rank's features
    # (the gather's backward adds what every rank's loss sends to them) and the temperature
    leaves = [image_features, text_features, logit_scale.detach().float()]
    if logit_bias is not None:
        leaves.append(logit_bias.detach().float())
    for leaf in leaves:
        leaf.requires_grad_()
    bias_leaf = leaves[3] if logit_bias is not None else None
    loss = features_loss(leaves[0], leaves[1], leaves[2], bias_leaf, tokens, info, cfg)
    cached = torch.autograd.grad(precision.scale(loss), leaves)  # d loss / d leaf, each leaf
    image_grads, text_grads = cached[0].split(chunk_size), cached[1].split(chunk_size)
    # 3. re-embed each chunk with graph and push the cached gradients through it; only the
    # last backward reduces gradients over ranks, and it carries the temperature's (and bias's)
    with _norm_stats_kept(model):
        for i, ((image_chunk, token_chunk), state) in enumerate(zip(chunks, states, strict=True)):
            last = i == len(chunks) - 1
            with grad_sync(model, last):
                with state.replay(), precision.autocast():
                    image_part, text_part, logit_scale, logit_bias = model(image_chunk, token_chunk)
                surrogate = (image_part.float() * image_grads[i]).sum()
                surrogate = surrogate + (text_part.float() * text_grads[i]).sum()
                if last:
                    surrogate = surrogate + (logit_scale * cached[2]).sum()
                    if logit_bias is not None:
                        surrogate = surrogate + (logit_bias * cached[3]).sum()
                surrogate.backward()
    return loss.detach()


def forward_backward(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    info: DistInfo,
    cfg: LossConfig,
    precision: Precision,
    *,
    grad_cache_chunk: int = 0,
    accum_steps: int = 1,
) -> torch.Tensor:
    """The step's gradient by the configured strategy (optim.grad_cache_chunk / accum_steps)."""
    if grad_cache_chunk:
        return grad_cache(model, images, tokens, info, cfg, precision, grad_cache_chunk)
    if accum_steps > 1:
        return accumulate(model, images, tokens, info, cfg, precision, accum_steps)
    return one_pass(model, images, tokens, info, cfg, precision)
