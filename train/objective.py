"""A step's loss, assembled: the rank's features -> the gathered global batch (with gradient) ->
the configured loss (train/loss.py) over it, with the negatives beyond the batch
(train/negatives.py) when loss.negatives asks for them.

`StepLoss` is that loss with everything but the features bound (config, ranks, the step's
negatives): the step strategies of train/step.py take one and call it on whatever features they
computed, whole batch, micro-batch (`StepLoss.part`) or GradCache's graph-free features.

Hard-negative captions (loss.hard_negatives) travel with their samples: `Inputs` holds K token
rows per sample and a mask of the real ones (padding where a sample has fewer, so the shapes
never change between steps), the text tower encodes them in the same forward as the captions,
and the loss gathers them across ranks like the captions, with gradient. The real ones (mask)
are picked out of the gathered global batch and become extra image->text columns for every
image of the global batch (NegCLIP's columns: any image may be scored against any sample's
negative, which costs nothing more than per-row columns and adds negatives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from train.config import LossConfig
from train.distributed import DistInfo, gather, gather_with_grad
from train.loss import (
    caption_labels,
    global_contrastive_loss,
    log_denominators,
    moving_log_average,
    queue_clip_loss,
    rank_loss,
)
from train.negatives import StepNegatives


@dataclass(frozen=True, slots=True)
class Inputs:
    """A rank's batch as the towers take it."""

    images: Tensor  # [n, 3, H, W]
    tokens: Tensor  # [n, L]
    negative_tokens: Tensor | None = None
    """loss.hard_negatives: each sample's hard-negative captions [n, K, L], padded to K."""
    negative_mask: Tensor | None = None
    """[n, K] bool: which of negative_tokens are real (not padding)."""

    def __post_init__(self) -> None:
        if (self.negative_tokens is None) != (self.negative_mask is None):
            raise ValueError("negative_tokens and negative_mask come together")
        if self.negative_mask is not None and self.negative_mask.shape[0] != len(self):
            raise ValueError(f"negative_mask must be [{len(self)}, K]")

    def __len__(self) -> int:
        return self.images.shape[0]

    def texts(self) -> Tensor:
        """What the text tower encodes: the captions, then the negatives [n + n*K, L]."""
        if self.negative_tokens is None:
            return self.tokens
        return torch.cat([self.tokens, self.negative_tokens.flatten(0, 1)])

    def split(self, size: int) -> list[Inputs]:
        """Consecutive pieces of `size` samples (the last may be shorter)."""
        parts: list[Any] = [self.images.split(size), self.tokens.split(size)]
        if self.negative_tokens is not None and self.negative_mask is not None:
            parts += [self.negative_tokens.split(size), self.negative_mask.split(size)]
        return [Inputs(*piece) for piece in zip(*parts, strict=True)]

    def chunk(self, parts: int) -> list[Inputs]:
        """`parts` pieces of (nearly) equal size, as Tensor.chunk cuts them."""
        return self.split(-(-len(self) // parts))


@dataclass(frozen=True, slots=True)
class Features:
    """The towers' output for `Inputs`: unit features and the temperature (and SigLIP's bias)."""

    images: Tensor  # [n, D]
    texts: Tensor  # [n, D]
    logit_scale: Tensor
    logit_bias: Tensor | None
    negatives: Tensor | None = None  # [n, K, D] the hard-negative captions' (padding included)

    @classmethod
    def of(cls, model: nn.Module, inputs: Inputs) -> Features:
        """Forward both towers through (possibly DDP- or FSDP-wrapped) `model`; the captions
        and their hard negatives go through the text tower together."""
        images, texts, logit_scale, logit_bias = model(inputs.images, inputs.texts())
        n, negatives = len(inputs), None
        if inputs.negative_tokens is not None:
            negatives = texts[n:].unflatten(0, inputs.negative_tokens.shape[:2])
        return cls(images, texts[:n], logit_scale, logit_bias, negatives)

    @property
    def _per_sample(self) -> list[Tensor]:
        """The tensors with a row per sample: images, texts[, negatives]."""
        return [self.images, self.texts] + ([] if self.negatives is None else [self.negatives])

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        """The features of consecutive pieces, joined as float32 (GradCache's first pass)."""
        columns = zip(*(p._per_sample for p in parts), strict=True)  # per kind, every piece's
        joined = [torch.cat([t.float() for t in pieces]) for pieces in columns]
        first = parts[0]
        return Features(joined[0], joined[1], first.logit_scale, first.logit_bias, *joined[2:])

    def leaves(self) -> list[Tensor]:
        """Detached float32 copies that require grad: GradCache differentiates the loss by them.
        Order: the per-sample tensors, the logit scale[, the logit bias] (`from_leaves`)."""
        tensors = [*self._per_sample, self.logit_scale]
        tensors += [] if self.logit_bias is None else [self.logit_bias]
        return [t.detach().float().requires_grad_() for t in tensors]

    def from_leaves(self, leaves: list[Tensor]) -> Features:
        """Features made of `leaves` (as `leaves` ordered them for these features)."""
        count = len(self._per_sample)
        per_sample, (scale, *bias) = leaves[:count], leaves[count:]
        negatives = per_sample[2] if count > 2 else None
        return Features(per_sample[0], per_sample[1], scale, bias[0] if bias else None, negatives)

    def surrogate(self, grads: list[Tensor], *, with_scale: bool) -> Tensor:
        """<features, their cached gradient>, summed: its backward pushes those gradients into
        the towers. The temperature's (and bias's) term only where `with_scale` (once a step)."""
        count = len(self._per_sample)
        pairs = [(t.float(), g) for t, g in zip(self._per_sample, grads[:count], strict=True)]
        if with_scale:
            shared = [self.logit_scale] + ([] if self.logit_bias is None else [self.logit_bias])
            pairs += list(zip(shared, grads[count:], strict=True))
        return torch.stack([(t * g).sum() for t, g in pairs]).sum()

    def split_grads(self, grads: list[Tensor], size: int) -> list[list[Tensor]]:
        """Per piece of `size` samples, its share of the per-sample gradients; the
        temperature's and bias's, one per step, are not split."""
        count = len(self._per_sample)
        pieces = zip(*(g.split(size) for g in grads[:count]), strict=True)
        return [[*piece, *grads[count:]] for piece in pieces]


@dataclass(frozen=True, slots=True)
class StepLoss:
    """This rank's loss of one step as a function of its features (see the module docstring)."""

    cfg: LossConfig
    info: DistInfo
    negatives: StepNegatives | None = None
    """The step's state for loss.negatives (train/negatives.py); None for negatives=batch."""

    def __call__(self, features: Features, inputs: Inputs) -> Tensor:
        return features_loss(features, inputs, self.info, self.cfg, self.negatives)

    def part(self, index: int, parts: int) -> StepLoss:
        """The loss of micro-batch `index` of `parts` (accumulation): its share of the negatives."""
        negatives = None if self.negatives is None else self.negatives.part(index, parts)
        return StepLoss(self.cfg, self.info, negatives)


def features_loss(
    features: Features,
    inputs: Inputs,
    info: DistInfo,
    cfg: LossConfig,
    negatives: StepNegatives | None = None,
) -> Tensor:
    """This rank's loss from its features [n, D] (and `inputs`' tokens, for multi_positive's
    labels).

    The loss sees the gathered global batch and owns the rows of this rank's samples. Always
    float32, outside autocast: the features may come from a bf16/fp16 forward, but log-sum-exps
    over thousands of logits need float32's mantissa.
    """
    n = features.images.shape[0]
    rows = slice(info.rank * n, (info.rank + 1) * n)
    with torch.autocast(features.images.device.type, enabled=False):
        images = gather_with_grad(features.images.float(), info)
        texts = gather_with_grad(features.texts.float(), info)
        scale = features.logit_scale.float()
        bias = None if features.logit_bias is None else features.logit_bias.float()
        extra = hard_negative_columns(features, inputs, info)
        if negatives is not None and cfg.negatives == "queue":
            return _queue_loss(images, texts, scale, bias, rows, info, cfg, negatives, extra)
        if negatives is not None and cfg.negatives == "global":
            return _global_loss(images, texts, scale, rows, info, cfg, negatives, extra)
        labels = None
        if cfg.kind == "multi_positive":
            labels = caption_labels(gather(inputs.tokens, info))
        return rank_loss(
            cfg, images, texts, scale, bias, rows=rows, labels=labels, extra_texts=extra
        )


def hard_negative_columns(features: Features, inputs: Inputs, info: DistInfo) -> Tensor | None:
    """The global batch's real hard-negative captions [M, D], float32, with gradient; None
    without hard negatives.

    Gathered whole ([W*n*K, D], the same shape on every rank and every step, as the gather
    needs), then the real ones are picked by the gathered mask: the padding's features get a
    zero gradient, exactly as if they had never been encoded.
    """
    if features.negatives is None or inputs.negative_mask is None:
        return None
    gathered = gather_with_grad(features.negatives.flatten(0, 1).float(), info)  # [W*n*K, D]
    # gloo gathers no bool tensors: the mask travels as bytes
    real = gather(inputs.negative_mask.flatten().to(torch.uint8), info).bool()
    return gathered[real]


def _queue_loss(
    images: Tensor,
    texts: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    rows: slice,
    info: DistInfo,
    cfg: LossConfig,
    negatives: StepNegatives,
    extra: Tensor | None,
) -> Tensor:
    """CLIP's loss with the queue's keys as extra negatives (and MoCo's in-batch keys), and
    the hard-negative captions `extra` [M, D]."""
    assert negatives.queue_images is not None and negatives.queue_texts is not None
    keys: dict[str, Tensor] = {}
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
        extra_texts=extra,
        **keys,
    )


def _global_loss(
    images: Tensor,
    texts: Tensor,
    scale: Tensor,
    rows: slice,
    info: DistInfo,
    cfg: LossConfig,
    negatives: StepNegatives,
    extra: Tensor | None,
) -> Tensor:
    """SogCLR / FastCLIP: update the batch's samples' estimates u, then the loss with them.
    Hard-negative captions `extra` [M, D] join the image anchors' negatives of the step."""
    assert negatives.denominators is not None and negatives.ids is not None
    learned = cfg.global_temperature == "learned"
    log_g = log_denominators(
        images,
        texts,
        scale if learned else scale.detach(),
        rows=rows,
        implementation=cfg.implementation,
        block_size=cfg.block_size,
        extra_texts=extra,
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


def contrastive_loss(model: nn.Module, inputs: Inputs, loss: StepLoss) -> Tensor:
    """Forward both towers through (possibly wrapped) `model`; return this rank's loss."""
    return loss(Features.of(model, inputs), inputs)
