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
SigLIP's sum of log-sigmoids is tiled the same way, and so are the hinge loss's row and column
maxima (or sums) of hinge terms, which are over the cosines themselves.

`reference_clip_loss` is the definition of `clip_loss` in five lines, for one process and
materialising the [N, N] logits; it is the oracle the tests compare `clip_loss` against.

Hard-negative captions (NegCLIP, Yuksekgonul et al. 2023) are `extra_texts` [M, D]: more
columns of the image->text direction, shared by every image anchor, with gradient (they are the
text tower's features of captions that are false for their images). The text->image direction
is unchanged: a negative caption is no anchor and has no image.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from train.config import HINGE_REDUCTIONS, LossConfig
from train.tiled import (
    DEFAULT_BLOCK_SIZE,
    BlockPlan,
    Span,
    TiledSoftplus,
    check_implementation,
    hardest,
    hinge_sums,
)
from train.tiled import lse as tiled_lse

__all__ = ["DEFAULT_BLOCK_SIZE"]  # re-exported: LossConfig's default block size


def reference_clip_loss(
    images: Tensor, texts: Tensor, logit_scale: Tensor, extra_texts: Tensor | None = None
) -> Tensor:
    """CLIP's loss by definition, for one process: cross-entropy over the [N, N] logits with
    pair i as class i, image->text (rows) and text->image (columns), averaged; extra_texts
    [M, D] are M more columns of every image's row. clip_loss computes the same, split over
    ranks and tiled."""
    columns = texts if extra_texts is None else torch.cat([texts, extra_texts])  # [N + M, D]
    by_image = logit_scale.exp() * images @ columns.T  # [N, N + M]
    by_text = logit_scale.exp() * texts @ images.T  # [N, N]
    labels = torch.arange(images.shape[0], device=images.device)
    return (F.cross_entropy(by_image, labels) + F.cross_entropy(by_text, labels)) / 2


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


def _symmetric(
    image_side: tuple[Tensor, Tensor], text_side: tuple[Tensor, Tensor], bias: Tensor | None
) -> Tensor:
    """The mean of the image anchors' and the text anchors' -log softmax, each given as
    (LSE, positive logit) per anchor: the two directions of a symmetric softmax loss."""
    return 0.5 * (
        _softmax_terms(*image_side, bias).mean() + _softmax_terms(*text_side, bias).mean()
    )


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
    extra_texts: Tensor | None = None,
) -> Tensor:
    """CLIP's symmetric InfoNCE: image->text and text->image cross-entropy, averaged.

    images, texts: [N, D] the global batch (unit vectors); rows: this rank's samples (None: all).
    The rank's image anchors meet all N texts (and extra_texts [M, D], hard negatives) and its
    text anchors all N images.
    """
    n = _check(images, texts, block_size)
    span = _span(rows, n)
    lse_images, lse_texts, positive = tiled_lse(
        images, texts, logit_scale, BlockPlan(n, span, span, block_size), implementation
    )
    by_image = _with_extra(
        lse_images[0], images, extra_texts, logit_scale, span, implementation, block_size
    )
    return _symmetric((by_image, positive), (lse_texts[0], positive), logit_bias)


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
    return _symmetric((lse_images, positive), (lse_texts, positive), logit_bias)


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


def _rows_lse(
    a: Tensor, keys: Tensor, logit_scale: Tensor, span: Span, implementation: str, block: int
) -> Tensor:
    """LSE over s * <A_i, K_j> for each of the rank's rows i of a [N, D] against keys [K, D]."""
    plan = BlockPlan(a.shape[0], span, None, block, n_cols=keys.shape[0])
    return tiled_lse(a, keys, logit_scale, plan, implementation).rows[0]


def _with_extra(
    lse: Tensor,
    anchors: Tensor,
    extra: Tensor | None,
    logit_scale: Tensor,
    span: Span,
    implementation: str,
    block: int,
) -> Tensor:
    """The rank's anchors' LSEs [n] with extra columns [M, D] added (none: unchanged)."""
    if extra is None or not extra.shape[0]:
        return lse
    if extra.ndim != 2 or extra.shape[1] != anchors.shape[1]:
        raise ValueError(f"extra_texts must be [M, {anchors.shape[1]}], got {list(extra.shape)}")
    return torch.logaddexp(lse, _rows_lse(anchors, extra, logit_scale, span, implementation, block))


def queue_clip_loss(
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    queue_images: Tensor,
    queue_texts: Tensor,
    key_images: Tensor | None = None,
    key_texts: Tensor | None = None,
    rows: slice | None = None,
    implementation: str = "tiled",
    block_size: int = DEFAULT_BLOCK_SIZE,
    extra_texts: Tensor | None = None,
) -> Tensor:
    """clip_loss with a queue of earlier keys as extra negatives (MoCo, He et al. 2020).

    An image anchor's candidates are the batch's texts and the K queued text keys
    queue_texts [K, D]; a text anchor's, the batch's images and queue_images. The queue has no
    gradient: it adds columns to each row's LSE. key_images, key_texts [N, D] (optional, no
    gradient): the batch's candidates are these momentum keys instead of the online features,
    as in MoCo, and only the anchors get gradient. An empty queue gives clip_loss.
    extra_texts [M, D]: hard-negative captions, more columns of the image anchors, with gradient.
    """
    n = _check(images, texts, block_size)
    span = _span(rows, n)
    for name, keys in (("queue_images", queue_images), ("queue_texts", queue_texts)):
        if keys.numel() and (keys.ndim != 2 or keys.shape[1] != images.shape[1]):
            raise ValueError(f"{name} must be [K, {images.shape[1]}], got {list(keys.shape)}")
    if key_images is None or key_texts is None:
        plan = BlockPlan(n, span, span, block_size)
        by_image, by_text, positive = tiled_lse(images, texts, logit_scale, plan, implementation)
        lse_images, lse_texts = by_image[0], by_text[0]
        image_positive = text_positive = positive
    else:
        lse_images = _rows_lse(images, key_texts, logit_scale, span, implementation, block_size)
        lse_texts = _rows_lse(texts, key_images, logit_scale, span, implementation, block_size)
        image_positive = _positives(images, key_texts, logit_scale, span)
        text_positive = _positives(texts, key_images, logit_scale, span)
    if queue_texts.shape[0]:
        from_queue = _rows_lse(images, queue_texts, logit_scale, span, implementation, block_size)
        lse_images = torch.logaddexp(lse_images, from_queue)
    if queue_images.shape[0]:
        from_queue = _rows_lse(texts, queue_images, logit_scale, span, implementation, block_size)
        lse_texts = torch.logaddexp(lse_texts, from_queue)
    lse_images = _with_extra(
        lse_images, images, extra_texts, logit_scale, span, implementation, block_size
    )
    return _symmetric((lse_images, image_positive), (lse_texts, text_positive), logit_bias)


def log_denominators(
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    *,
    rows: slice | None = None,
    implementation: str = "tiled",
    block_size: int = DEFAULT_BLOCK_SIZE,
    extra_texts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """log g of the rank's image anchors and of its text anchors: [n] each, differentiable.

    g_i = 1/(N-1) sum_{j != i} exp(s * (<I_i, T_j> - <I_i, T_i>)), the batch's estimate of the
    mean over all negatives that the global contrastive loss tracks per sample (text anchors
    alike, over images). clip_loss's image term is log(1 + (N-1) g_i). extra_texts [M, D] (hard
    negatives) join the image anchors' negatives: their mean is then over N - 1 + M.
    """
    n = _check(images, texts, block_size)
    if n < 2:
        raise ValueError("the global contrastive loss needs a global batch of at least 2")
    span = _span(rows, n)
    plan = BlockPlan(n, span, span, block_size, exclude_diagonal=True)
    # LSEs over the negatives only; the pairs' logits are taken before they are excluded
    by_image, by_text, positive = tiled_lse(images, texts, logit_scale, plan, implementation)
    lse_images = _with_extra(
        by_image[0], images, extra_texts, logit_scale, span, implementation, block_size
    )
    extra = 0 if extra_texts is None else extra_texts.shape[0]
    return (
        lse_images - (positive + math.log(n - 1 + extra)),
        by_text[0] - (positive + math.log(n - 1)),
    )


def moving_log_average(log_u: Tensor, log_g: Tensor, gamma: float) -> Tensor:
    """log((1 - gamma) * u + gamma * g) elementwise, without gradient; log g where u is unknown
    (NaN: the sample's first visit), so that no estimate starts from an arbitrary value."""
    log_g = log_g.detach()
    if gamma == 1:
        return log_g
    mixed = torch.logaddexp(log_u + math.log1p(-gamma), log_g + math.log(gamma))
    return torch.where(torch.isnan(log_u), log_g, mixed)


def global_contrastive_loss(
    log_g: tuple[Tensor, Tensor],
    log_u: tuple[Tensor, Tensor],
    logit_scale: Tensor,
    *,
    temperature: str = "learned",
    rho: float = 6.5,
    eps: float = 1e-14,
) -> Tensor:
    """SogCLR's / FastCLIP-v3's global contrastive loss from the batch's log g (image and text
    anchors, with gradient) and the updated per-sample estimates log u (no gradient).

    The objective is F = 1/2 mean_i tau * (log(eps + u1_i) + log(eps + u2_i)) + rho * tau, the
    contrastive loss over the whole dataset's negatives; a batch cannot compute it, so the
    gradient is estimated with u in place of g: dF/dw ~ tau / (eps + u) * dg/dw, and (learned
    temperature) dF/dtau ~ log(eps + u) + tau / (eps + u) * dg/dtau + rho. The returned tensor
    has those gradients and F's estimate as its value. temperature="fixed": tau is a constant
    (SogCLR; pass logit_scale, it gets a zero gradient) and F has no rho term.
    """
    scale = logit_scale if temperature == "learned" else logit_scale.detach()
    tau = (-scale).exp()
    surrogate, objective = logit_scale * 0.0, torch.zeros((), device=logit_scale.device)
    for log_g_side, log_u_side in zip(log_g, log_u, strict=True):
        log_eps_u = torch.logaddexp(log_u_side.detach(), log_u_side.new_tensor(math.log(eps)))
        ratio = (log_g_side - log_eps_u).exp()  # g / (eps + u), with g's gradient
        surrogate = surrogate + 0.5 * tau * (ratio - ratio.detach() + log_eps_u).mean()
        objective = objective + 0.5 * tau.detach() * log_eps_u.mean()
    if temperature == "learned":
        surrogate, objective = surrogate + rho * tau, objective + rho * tau.detach()
    return surrogate - surrogate.detach() + objective


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
    return _symmetric((lse_images[0], image_positive), (lse_texts[0], text_positive), logit_bias)


def hinge_loss(
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    margin: float = 0.2,
    reduction: str = "max",
    rows: slice | None = None,
    implementation: str = "tiled",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """VSE++'s triplet loss (Faghri et al. 2018) over the cosines c_ij = <I_i, T_j>:

        L_i = red_{j != i} [margin - c_ii + c_ij]_+  +  red_{j != i} [margin - c_ii + c_ji]_+

    (pair i's image against the other texts, its text against the other images), averaged over
    the rank's pairs. red = max: VSE++'s hardest negative ("max of hinges"; a tie sends the
    gradient to the lowest index); red = sum: VSE0, the classic sum over negatives.
    Cosines, not logits: logit_scale and logit_bias are unused. They enter as 0 * parameter, an
    exact zero gradient, so that DDP finds them used (as the bias in _softmax_terms).
    """
    n = _check(images, texts, block_size)
    if n < 2:
        raise ValueError("the hinge loss needs a global batch of at least 2 (negatives)")
    if reduction not in HINGE_REDUCTIONS:
        raise ValueError(f"reduction must be max or sum, got {reduction!r}")
    span = _span(rows, n)
    own = slice(*span)
    plan = BlockPlan(n, span, span, block_size, exclude_diagonal=True)  # negatives only
    shift = margin - (images[own] * texts[own]).sum(-1)  # [n] margin - c_ii, both directions
    if reduction == "max":  # the max of the hinges is the hinge of the largest cosine
        by_image, by_text = hardest(images, texts, plan, implementation)
        terms = F.relu(shift + by_image) + F.relu(shift + by_text)
    else:
        by_image, by_text = hinge_sums(images, texts, shift, shift, plan, implementation)
        terms = by_image + by_text
    unused = 0.0 * logit_scale if logit_bias is None else 0.0 * (logit_scale + logit_bias)
    return terms.mean() + unused


def rank_loss(
    cfg: LossConfig,
    images: Tensor,
    texts: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    rows: slice | None = None,
    labels: Tensor | None = None,
    extra_texts: Tensor | None = None,
) -> Tensor:
    """This rank's loss of kind `cfg.kind`: the one place where the config picks the loss.

    labels ([N], e.g. caption_labels of the global batch's tokens) is needed by multi_positive;
    extra_texts ([M, D], hard-negative captions) are taken by clip only.
    """
    if extra_texts is not None and cfg.kind != "clip":
        raise ValueError(f"hard-negative captions work with loss.kind=clip only, not {cfg.kind}")
    common: dict[str, Any] = {
        "rows": rows,
        "implementation": cfg.implementation,
        "block_size": cfg.block_size,
    }
    args = (images, texts, logit_scale, logit_bias)
    match cfg.kind:
        case "clip":
            return clip_loss(*args, extra_texts=extra_texts, **common)
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
        case "hinge":
            margin, reduction = cfg.hinge_margin, cfg.hinge_reduction
            return hinge_loss(*args, margin=margin, reduction=reduction, **common)
    raise ValueError(f"loss.kind: unknown loss {cfg.kind!r}")
