"""The loss of a step's features, and its forward and backward: one pass, GradCache chunks, or
micro-batches.

`features_loss` composes the loss: features of the rank's batch -> gathered global batch (with
gradient) -> the configured loss (train/loss.py) over it, with the negatives beyond the batch
(train/negatives.py) when loss.negatives asks for them.

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
from train.distributed import DistInfo, gather, gather_with_grad, grad_sync, unwrap
from train.loss import (
    caption_labels,
    global_contrastive_loss,
    log_denominators,
    moving_log_average,
    queue_clip_loss,
    rank_loss,
)
from train.negatives import StepNegatives


def features_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    tokens: torch.Tensor,
    info: DistInfo,
    cfg: LossConfig,
    negatives: StepNegatives | None = None,
) -> torch.Tensor:
    """This rank's loss from its features [n, D] (and tokens, for multi_positive's labels).

    The loss sees the gathered global batch and owns the rows of this rank's samples. Always
    float32, outside autocast: the features may come from a bf16/fp16 forward, but log-sum-exps
    over thousands of logits need float32's mantissa.
    """
    n = image_features.shape[0]
    rows = slice(info.rank * n, (info.rank + 1) * n)
    with torch.autocast(image_features.device.type, enabled=False):
        images = gather_with_grad(image_features.float(), info)
        texts = gather_with_grad(text_features.float(), info)
        scale = logit_scale.float()
        bias = None if logit_bias is None else logit_bias.float()
        if negatives is not None and cfg.negatives == "queue":
            return _queue_loss(images, texts, scale, bias, rows, info, cfg, negatives)
        if negatives is not None and cfg.negatives == "global":
            return _global_loss(images, texts, scale, rows, info, cfg, negatives)
        labels = caption_labels(gather(tokens, info)) if cfg.kind == "multi_positive" else None
        return rank_loss(cfg, images, texts, scale, bias, rows=rows, labels=labels)


def _queue_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    rows: slice,
    info: DistInfo,
    cfg: LossConfig,
    negatives: StepNegatives,
) -> torch.Tensor:
    """CLIP's loss with the queue's keys as extra negatives (and MoCo's in-batch keys)."""
    assert negatives.queue_images is not None and negatives.queue_texts is not None
    keys: dict[str, torch.Tensor] = {}
    if cfg.queue_batch_keys == "momentum":
        assert negatives.key_images is not None and negatives.key_texts is not None
        keys = {
            "key_images": gather(negatives.key_images, info),
            "key_texts": gather(negatives.key_texts, info),
        }
    elif negatives.key_images is None:  # no key encoder: the queue takes these features
        negatives.collected.append((images.detach(), texts.detach()))
    return queue_clip_loss(
        images,
        texts,
        scale,
        bias,
        queue_images=negatives.queue_images,
        queue_texts=negatives.queue_texts,
        rows=rows,
        implementation=cfg.implementation,
        block_size=cfg.block_size,
        **keys,
    )


def _global_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    scale: torch.Tensor,
    rows: slice,
    info: DistInfo,
    cfg: LossConfig,
    negatives: StepNegatives,
) -> torch.Tensor:
    """SogCLR / FastCLIP: update the batch's samples' estimates u, then the loss with them."""
    assert negatives.denominators is not None and negatives.ids is not None
    learned = cfg.global_temperature == "learned"
    log_g = log_denominators(
        images,
        texts,
        scale if learned else scale.detach(),
        rows=rows,
        implementation=cfg.implementation,
        block_size=cfg.block_size,
    )
    ids = gather(negatives.ids, info)
    old = negatives.denominators.lookup(ids)[rows]  # [n, 2]
    new = torch.stack(
        [moving_log_average(old[:, side], log_g[side], cfg.global_gamma) for side in (0, 1)], 1
    )
    # a non-finite estimate (a step about to be skipped) is not kept: the sample starts over
    kept = torch.where(torch.isfinite(new), new, torch.full_like(new, float("nan")))
    negatives.denominators.store(ids, gather(kept, info))
    return global_contrastive_loss(
        log_g,
        (new[:, 0], new[:, 1]),
        scale,
        temperature=cfg.global_temperature,
        rho=cfg.global_rho,
        eps=cfg.global_eps,
    )


def contrastive_loss(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    info: DistInfo,
    cfg: LossConfig,
    negatives: StepNegatives | None = None,
) -> torch.Tensor:
    """Forward both towers through (possibly DDP-wrapped) `model`; return this rank's loss."""
    image_features, text_features, logit_scale, logit_bias = model(images, tokens)
    return features_loss(
        image_features, text_features, logit_scale, logit_bias, tokens, info, cfg, negatives
    )


def one_pass(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    info: DistInfo,
    cfg: LossConfig,
    precision: Precision,
    negatives: StepNegatives | None = None,
) -> torch.Tensor:
    """The whole per-rank batch in one forward and one backward."""
    with precision.autocast():
        image_features, text_features, logit_scale, logit_bias = model(images, tokens)
    loss = features_loss(
        image_features, text_features, logit_scale, logit_bias, tokens, info, cfg, negatives
    )
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
    negatives: StepNegatives | None = None,
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
            part = None if negatives is None else negatives.part(i, len(parts))
            loss = features_loss(
                image_features, text_features, scale, bias, token_part, info, cfg, part
            )
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
    negatives: StepNegatives | None = None,
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
    loss = features_loss(leaves[0], leaves[1], leaves[2], bias_leaf, tokens, info, cfg, negatives)
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
    negatives: StepNegatives | None = None,
) -> torch.Tensor:
    """The step's gradient by the configured strategy (optim.grad_cache_chunk / accum_steps).

    negatives: the step's state for loss.negatives (train/negatives.py), or None.
    """
    args = (model, images, tokens, info, cfg, precision)
    if grad_cache_chunk:
        return grad_cache(*args, grad_cache_chunk, negatives)
    if accum_steps > 1:
        return accumulate(*args, accum_steps, negatives)
    return one_pass(*args, negatives)
