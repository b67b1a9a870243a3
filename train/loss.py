"""Contrastive losses over L2-normalised features: pure tensor code, no process-group logic.

Every loss is one rank's share of a loss over the global batch. It takes the global batch's
features `images`, `texts` [N, D] (gathered with gradient) and `rows`, the slice of samples this
rank owns, and averages over its own anchors only. So the rank losses average to the global loss,
and since the gather's backward sums what every rank's loss sends to each feature (see
train/distributed.py), DDP's average of the rank gradients is the global loss's gradient. With one
process `rows` is the whole batch.

Logits are s*cos + b: s = exp(logit_scale), the learned inverse temperature kept in log space, and
b an optional learned bias. The softmax losses are written once, over log-sum-exps (LSEs) of the
logit matrix, and `implementation` chooses how those LSEs are computed (train/tiled.py):
plain materialises the rank's [n, N] logits, tiled streams over blocks in O(N*D) memory.
SigLIP's sum of log-sigmoids is tiled the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from train.config import LossConfig
from train.tiled import DEFAULT_BLOCK_SIZE, BlockPlan, Span, TiledSoftplus, check_implementation
from train.tiled import lse as tiled_lse

__all__ = ["DEFAULT_BLOCK_SIZE"]  # re-exported: LossConfig's default block size


def _span(rows: slice | None, n: int) -> Span:
    """This rank's [start, stop) in a global batch of n; None means all of it."""
    start, stop, step = (rows or slice(None)).indices(n)
    if step != 1 or start >= stop:
        raise ValueError(f"rows must be a non-empty contiguous slice of 0..{n}, got {rows}")
    return start, stop


def _biased(x: Tensor, bias: Tensor | None) -> Tensor:
    return x if bias is None else x + bias


def _positives(images: Tensor, texts: Tensor, logit_scale: Tensor, span: Span) -> Tensor:
    """The rank's positive-pair logits s * <I_i, T_i>: [n]."""
    rows = slice(*span)
    return logit_scale.exp() * (images[rows] * texts[rows]).sum(-1)


def _softmax_terms(lse: Tensor, positive: Tensor, bias: Tensor | None) -> Tensor:
    """-log softmax of each anchor's positive: LSE - positive logit.

    A bias shifts both and cancels (softmax is shift-invariant). It is added anyway so that the
    loss is literally the formula with b, its gradient is exactly 0, and DDP sees it used.
    """
    return _biased(lse, bias) - _biased(positive, bias)


def _check(images: Tensor, texts: Tensor, block_size: int) -> int:
    if images.ndim != 2 or images.shape != texts.shape:
        raise ValueError(
            f"need images and texts of one shape [N, D], got {images.shape}, {texts.shape}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return images.shape[0]


def clip_loss(
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    rows: slice | None = None,
    implementation: str = "tiled",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """CLIP's symmetric InfoNCE: image->text and text->image cross-entropy, averaged.

    images, texts: [N, D] the global batch (unit vectors); rows: this rank's samples (None: all).
    The rank's image anchors meet all N texts and its text anchors all N images.
    """
    n = _check(images, texts, block_size)
    span = _span(rows, n)
    lse_images, lse_texts, positive = tiled_lse(
        images, texts, logit_scale, BlockPlan(n, span, span, block_size), implementation
    )
    return 0.5 * (
        _softmax_terms(lse_images[0], positive, logit_bias).mean()
        + _softmax_terms(lse_texts[0], positive, logit_bias).mean()
    )


def nt_xent_loss(
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    rows: slice | None = None,
    implementation: str = "tiled",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """SimCLR's NT-Xent over the 2N embeddings [images; texts].

    Each embedding's candidates are the 2N - 1 others of both modalities (not itself), its
    positive is its pair. A rank owns 2n anchors, its images and its texts, and averages over
    them, so the rank losses average to the mean over all 2N anchors.
    """
    n = _check(images, texts, block_size)
    span = _span(rows, n)
    cross, itself = (
        BlockPlan(n, span, span, block_size),
        BlockPlan(n, span, None, block_size, exclude_diagonal=True),
    )
    image_texts, text_images, positive = tiled_lse(
        images, texts, logit_scale, cross, implementation
    )
    image_images = tiled_lse(images, images, logit_scale, itself, implementation).rows
    text_texts = tiled_lse(texts, texts, logit_scale, itself, implementation).rows
    lse_images = torch.logaddexp(image_texts[0], image_images[0])
    lse_texts = torch.logaddexp(text_images[0], text_texts[0])
    return 0.5 * (
        _softmax_terms(lse_images, positive, logit_bias).mean()
        + _softmax_terms(lse_texts, positive, logit_bias).mean()
    )


def siglip_loss(
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    rows: slice | None = None,
    implementation: str = "tiled",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """SigLIP: -sum_j log sigmoid(z_ij * logit_ij), averaged over the rank's images.

    z_ij = +1 for the pair i == j, -1 for every other image-text pair (each pair once, so
    there is no second direction). Zhai et al. start at s = 10 (logit_scale = log 10), b = -10.
    """
    n = _check(images, texts, block_size)
    start, stop = span = _span(rows, n)
    check_implementation(implementation)
    plan = BlockPlan(n, span, None, block_size)
    if implementation == "plain" or plan.single_block:
        logits = _biased(logit_scale.exp() * images[start:stop] @ texts.T, logit_bias)  # [n, N]
        labels = -torch.ones_like(logits)
        labels.diagonal(start).fill_(1.0)  # +1 on the pairs (i, i), -1 elsewhere
        return -F.logsigmoid(labels * logits).sum() / (stop - start)
    # -log sigmoid(-x) = softplus(x) for every pair, and -log sigmoid(x) = softplus(x) - x, so
    # the positives only subtract their logits
    all_pairs = TiledSoftplus.apply(images, texts, logit_scale, logit_bias, plan)
    positive = _biased(_positives(images, texts, logit_scale, span), logit_bias)
    return (all_pairs - positive.sum()) / (stop - start)


def _debiased_terms(
    log_negatives: Tensor,
    positive: Tensor,
    floor: Tensor,
    tau_plus: float,
    count: int,
) -> Tensor:
    """-log(e^pos / (e^pos + Ng)) with Chuang et al.'s estimate of the true negatives' mass

        Ng = max((sum_neg - tau+ * M * e^pos) / (1 - tau+),  M * e^floor),

    in log space (M = count of negatives, floor = the smallest possible logit).
    """
    log_ng = log_negatives
    if tau_plus > 0:
        gap = log_negatives - (positive + math.log(tau_plus * count))  # > 0 iff Ng's first term is
        valid = gap > 0
        safe_gap = torch.where(valid, gap, torch.ones_like(gap))  # no inf/nan in unused branch
        log_difference = log_negatives + torch.log(-torch.expm1(-safe_gap))
        log_ng = torch.where(valid, log_difference, -math.inf) - math.log1p(-tau_plus)
    log_ng = torch.maximum(log_ng, floor + math.log(count))
    return F.softplus(log_ng - positive)


def debiased_loss(
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    tau_plus: float = 0.1,
    beta: float | None = None,
    rows: slice | None = None,
    implementation: str = "tiled",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """Debiased contrastive loss (Chuang et al. 2020), image->text and text->image averaged.

    An image anchor's negatives are the N - 1 other texts (and the other way round). tau_plus is
    the prior chance that a "negative" shares the anchor's class; its expected mass is taken out
    of the negatives' sum. tau_plus = 0 is clip_loss. With beta, the negatives are importance-
    weighted by exp(beta * logit) first: Robinson et al.'s hard negatives (hard_negative_loss).
    """
    n = _check(images, texts, block_size)
    if n < 2:
        raise ValueError("the debiased losses need a global batch of at least 2 (negatives)")
    span = _span(rows, n)
    multipliers = (1.0,) if beta is None else (beta, 1.0 + beta)
    plan = BlockPlan(n, span, span, block_size, multipliers, exclude_diagonal=True)
    # LSEs over the negatives only; the pairs' logits are taken before they are excluded
    by_image, by_text, positive = tiled_lse(images, texts, logit_scale, plan, implementation)
    positive = _biased(positive, logit_bias)
    floor = _biased(-logit_scale.exp(), logit_bias)  # cos >= -1
    terms = []
    for lse in (by_image, by_text):
        # hard negatives: weights e^(beta*l) normalised to mean 1 over the M = n - 1 negatives,
        # so the reweighted sum is M * sum e^((1+beta)*l) / sum e^(beta*l)
        log_negatives = lse[0] if beta is None else lse[1] - lse[0] + math.log(n - 1)
        log_negatives = _biased(log_negatives, logit_bias)
        terms.append(_debiased_terms(log_negatives, positive, floor, tau_plus, n - 1).mean())
    return 0.5 * (terms[0] + terms[1])


def hard_negative_loss(
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    beta: float = 1.0,
    **kwargs: Any,
) -> Tensor:
    """Hard-negative contrastive loss (Robinson et al. 2021): debiased_loss whose negatives are
    importance-weighted by exp(beta * logit), so that negatives near the anchor count more.
    kwargs: tau_plus, rows, implementation, block_size as for debiased_loss."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (beta = 0 is debiased_loss), got {beta}")
    return debiased_loss(images, texts, logit_scale, logit_bias, beta=beta, **kwargs)


def caption_labels(tokens: Tensor) -> Tensor:
    """[N, L] token ids -> [N] labels, equal exactly where the captions are identical."""
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def _label_means(x: Tensor, labels: Tensor) -> Tensor:
    """For each row of x [N, D], the mean of the rows sharing its label: [N, D]."""
    if labels.shape != x.shape[:1]:
        raise ValueError(f"labels must have shape [{x.shape[0]}], got {list(labels.shape)}")
    _, labels = torch.unique(labels, return_inverse=True)  # 0..C-1, so C <= N slots suffice
    sums = torch.zeros_like(x).index_add(0, labels, x)
    counts = torch.bincount(labels, minlength=x.shape[0]).to(x.dtype)
    return (sums / counts.clamp(min=1)[:, None])[labels]


def multi_positive_loss(
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    labels: Tensor,
    rows: slice | None = None,
    implementation: str = "tiled",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """SupCon-style symmetric InfoNCE: every sample with the anchor's label is a positive.

    labels: [N] over the global batch (e.g. `caption_labels`, since duplicate captions are common
    in web data). An image anchor's loss is the mean of -log softmax over the texts of all
    samples with its label (SupCon's L_out); text anchors likewise over images. Unique labels
    give clip_loss. So do exact duplicate captions, in total: their identical text features make
    CLIP already aim each caption at the uniform mix of its images. It differs where a label
    groups texts that embed differently (class labels, near-duplicate captions).
    """
    n = _check(images, texts, block_size)
    span = _span(rows, n)
    plan = BlockPlan(n, span, span, block_size)
    lse_images, lse_texts, _ = tiled_lse(images, texts, logit_scale, plan, implementation)
    scale, own = logit_scale.exp(), slice(*span)
    # mean over positives p of s*<I_i, T_p> is s*<I_i, mean_p T_p>: O(N*D), no [N, N] mask
    image_positive = scale * (images[own] * _label_means(texts, labels)[own]).sum(-1)
    text_positive = scale * (texts[own] * _label_means(images, labels)[own]).sum(-1)
    return 0.5 * (
        _softmax_terms(lse_images[0], image_positive, logit_bias).mean()
        + _softmax_terms(lse_texts[0], text_positive, logit_bias).mean()
    )


def rank_loss(
    cfg: LossConfig,
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    rows: slice | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """This rank's loss of kind `cfg.kind`: the one place where the config picks the loss.

    labels ([N], e.g. caption_labels of the global batch's tokens) is needed by multi_positive.
    """
    common: dict[str, Any] = {
        "rows": rows,
        "implementation": cfg.implementation,
        "block_size": cfg.block_size,
    }
    args = (images, texts, logit_scale, logit_bias)
    match cfg.kind:
        case "clip":
            return clip_loss(*args, **common)
        case "nt_xent":
            return nt_xent_loss(*args, **common)
        case "siglip":
            return siglip_loss(*args, **common)
        case "debiased":
            return debiased_loss(*args, tau_plus=cfg.debiased_tau_plus, **common)
        case "hard_negative":
            beta = cfg.hard_negative_beta
            return hard_negative_loss(*args, tau_plus=cfg.debiased_tau_plus, beta=beta, **common)
        case "multi_positive":
            if labels is None:
                raise ValueError("multi_positive needs the global batch's labels")
            return multi_positive_loss(*args, labels=labels, **common)
    raise ValueError(f"loss.kind: unknown loss {cfg.kind!r}")
