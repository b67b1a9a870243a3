"""Contrastive losses over L2-normalised features: pure tensor code, no process-group logic.

Every loss is one rank's share of a loss over the global batch. It takes the global batch's
features `images`, `texts` [N, D] (gathered with gradient) and `rows`, the slice of samples this
rank owns, and averages over its own anchors only. So the rank losses average to the global loss,
and since the gather's backward sums what every rank's loss sends to each feature (see
train/distributed.py), DDP's average of the rank gradients is the global loss's gradient. With one
process `rows` is the whole batch.

Logits are s*cos + b: s = exp(logit_scale), the learned inverse temperature kept in log space, and
b an optional learned bias. The softmax losses are written once, over log-sum-exps (LSEs) of the
logit matrix, and `implementation` chooses how those LSEs are computed:
    plain   materialises the rank's [n, N] logits; they and their gradient cost ~n*N floats;
    tiled   `_TiledLSE` streams over blocks and keeps only running row and column LSEs; its
            backward recomputes each block. Memory O(N*D + block^2), same arithmetic. A batch
            that fits in one block (N <= block_size) is computed as plain computes it.
SigLIP's sum of log-sigmoids is tiled the same way (`_TiledSoftplus`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from train.config import LossConfig

Span = tuple[int, int]  # [start, stop) of samples in the global batch

# Blocks of 1024..2048 rows are equally fast on 2 CPU cores (bench/loss.py); a block buffer is
# block_size^2 floats (16 MB), four of them live at once. LossConfig.block_size is the same.
DEFAULT_BLOCK_SIZE = 2048


def _cut(span: Span, n: int, block: int) -> list[tuple[slice, bool]]:
    """[0, n) in blocks of at most `block`, none straddling span's edges; True inside span."""
    start, stop = span
    parts = ((0, start, False), (start, stop, True), (stop, n, False))
    return [
        (slice(i, min(i + block, hi)), inside)
        for lo, hi, inside in parts
        for i in range(lo, hi, block)
    ]


def _local(block: slice, span: Span | None) -> slice:
    """A block of global indices as indices into the span's own vector."""
    offset = span[0] if span else 0
    return slice(block.start - offset, block.stop - offset)


@dataclass(frozen=True, slots=True)
class _Plan:
    """Which blocks of the [N, N] logit matrix s*A*B^T a rank visits, and what it takes there.

    A rank needs the LSE over every column of each of its rows (A's anchors) and, for symmetric
    losses, the LSE over every row of each of its columns (B's anchors): a row stripe and a
    column stripe. With one process both are the whole matrix, and each block is computed once.
    """

    n: int
    rows: Span
    cols: Span | None
    block: int
    multipliers: tuple[float, ...] = (1.0,)
    """LSEs are of m * logits for each m (hard-negative reweighting needs beta and 1 + beta)."""
    exclude_diagonal: bool = False
    """Leave out logit (i, i): the anchor itself (NT-Xent) or its positive (negatives only)."""

    def blocks(self) -> Iterator[tuple[slice, slice, bool, bool]]:
        """(row block, column block, in the row stripe, in the column stripe), as needed."""
        for r, r_in in _cut(self.rows, self.n, self.block):
            for c, c_in in _cut(self.cols or (0, 0), self.n, self.block):
                if r_in or c_in:
                    yield r, c, r_in, c_in

    def logits(self, a_scaled: Tensor, b: Tensor, r: slice, c: slice, out: Tensor) -> Tensor:
        x = torch.mm(a_scaled[r], b[c].T, out=out)  # [br, bc]
        if self.exclude_diagonal:  # global (i, i) sits where column - row == r.start - c.start
            x.diagonal(r.start - c.start).fill_(-math.inf)
        return x

    @property
    def width(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], (self.cols[1] - self.cols[0]) if self.cols else 0

    @property
    def single_block(self) -> bool:
        """One block covers everything (N <= block): then tiling has nothing to save, and the
        plain computation, which needs no recompute, is used (its memory is a few block^2)."""
        return sum(1 for _ in self.blocks()) == 1


class _Scratch:
    """Reusable block buffers: a fresh multi-MB tensor per block would page-fault every time."""

    def __init__(self, like: Tensor, plan: _Plan, count: int) -> None:
        side = min(plan.block, plan.n)
        self.flat = [like.new_empty(side * side) for _ in range(count)]

    def __call__(self, i: int, r: slice, c: slice) -> Tensor:
        rows, cols = r.stop - r.start, c.stop - c.start
        return self.flat[i][: rows * cols].view(rows, cols)


# torch's CPU exp is ~10x slower on arguments whose result underflows (measured here), and
# large logit scales produce many. Raising exp's argument to this floor changes each term by
# less than e^-80 = 2e-35 of the largest one, far below float32 and float64 resolution.
_EXP_FLOOR = -80.0


def _block_lse(x: Tensor, dim: int, out: Tensor) -> Tensor:
    """logsumexp of x along dim (with `out`, x's shape, as scratch)."""
    top = x.amax(dim, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)  # all -inf: finite
    total = torch.sub(x, top, out=out).clamp_(min=_EXP_FLOOR).exp_().sum(dim)
    return total.log_().add_(top.squeeze(dim))


class _TiledLSE(torch.autograd.Function):
    """Row and column LSEs of m * s*A*B^T ([K, rows], [K, cols]), block by block.

    Forward folds each block's LSEs into running ones (log-add-exp) and drops the block. Backward
    recomputes it: the logit gradient is sum_k m_k (g_row * P_row + g_col * P_col) with P the
    softmaxes, which flows to A and B by two matmuls, and to the log scale as <A, dA>, because
    the logits are s * cos and d logits / d log s = logits.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, logit_scale: Tensor, plan: _Plan) -> Any:
        a_scaled = a * logit_scale.exp()
        rows = a.new_full((len(plan.multipliers), plan.width[0]), -math.inf)
        cols = a.new_full((len(plan.multipliers), plan.width[1]), -math.inf)
        scratch = _Scratch(a, plan, 3)
        for r, c, r_in, c_in in plan.blocks():
            x = plan.logits(a_scaled, b, r, c, scratch(0, r, c))
            rr, cc = _local(r, plan.rows), _local(c, plan.cols)
            for k, m in enumerate(plan.multipliers):
                xm = x if m == 1 else torch.mul(x, m, out=scratch(1, r, c))
                if r_in:
                    rows[k, rr] = torch.logaddexp(rows[k, rr], _block_lse(xm, 1, scratch(2, r, c)))
                if c_in:
                    cols[k, cc] = torch.logaddexp(cols[k, cc], _block_lse(xm, 0, scratch(2, r, c)))
        ctx.plan = plan
        ctx.save_for_backward(a, b, logit_scale, rows, cols)
        return rows, cols

    @staticmethod
    def backward(ctx: Any, g_rows: Tensor, g_cols: Tensor) -> Any:
        a, b, logit_scale, lse_rows, lse_cols = ctx.saved_tensors
        plan: _Plan = ctx.plan
        scale = logit_scale.exp()
        a_scaled = a * scale
        da, db = torch.zeros_like(a), torch.zeros_like(b)
        scratch = _Scratch(a, plan, 4)
        for r, c, r_in, c_in in plan.blocks():
            x = plan.logits(a_scaled, b, r, c, scratch(0, r, c))
            rr, cc = _local(r, plan.rows), _local(c, plan.cols)
            terms = []  # (multiplier, final LSE, d loss / d LSE), broadcast over the block
            for k, m in enumerate(plan.multipliers):
                terms += [(m, lse_rows[k, rr, None], g_rows[k, rr, None])] if r_in else []
                terms += [(m, lse_cols[k, None, cc], g_cols[k, None, cc])] if c_in else []
            g = _logit_grad(x, terms, *(scratch(i, r, c) for i in (1, 2, 3)))
            da[r].addmm_(g, b[c])
            db[c].addmm_(g.T, a_scaled[r])
        da.mul_(scale)
        return da, db, (a * da).sum().reshape(logit_scale.shape), None


def _logit_grad(
    x: Tensor, terms: list[tuple[float, Tensor, Tensor]], out: Tensor, tmp: Tensor, xm: Tensor
) -> Tensor:
    """One block's d loss / d logits: sum of m * weight * softmax, softmax = exp(m*x - LSE)."""
    g: Tensor | None = None
    for m, lse, weight in terms:
        scaled = x if m == 1 else torch.mul(x, m, out=xm)
        p = torch.sub(scaled, lse, out=tmp if g is not None else out).clamp_(min=_EXP_FLOOR)
        p = p.exp_()
        g = p.mul_(m * weight) if g is None else g.addcmul_(p, m * weight)
    assert g is not None, "every block of the plan is in a row or a column stripe"
    return g


def _plain_lse(a: Tensor, b: Tensor, logit_scale: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
    """The same LSEs as `_TiledLSE` from materialised [n, N] and [N, n] logits (autograd)."""
    a_scaled = a * logit_scale.exp()
    n = plan.n

    def logits(r: Span, c: Span) -> Tensor:
        x = a_scaled[r[0] : r[1]] @ b[c[0] : c[1]].T
        if plan.exclude_diagonal:
            i = torch.arange(r[0], r[1], device=x.device)[:, None]
            x = x.masked_fill(i == torch.arange(c[0], c[1], device=x.device), -math.inf)
        return x

    def lse(x: Tensor, dim: int) -> Tensor:
        return torch.stack([(x if m == 1 else m * x).logsumexp(dim) for m in plan.multipliers])

    by_row = logits(plan.rows, (0, n))  # [n, N]
    if plan.cols is None:
        return lse(by_row, 1), by_row.new_empty(len(plan.multipliers), 0)
    one_process = plan.rows == plan.cols == (0, n)  # then the columns are the same matrix
    by_col = by_row if one_process else logits((0, n), plan.cols)  # [N, n]
    return lse(by_row, 1), lse(by_col, 0)


def _lse(
    a: Tensor, b: Tensor, logit_scale: Tensor, plan: _Plan, implementation: str
) -> tuple[Tensor, Tensor]:
    _check_implementation(implementation)
    if implementation == "tiled" and not plan.single_block:
        return _TiledLSE.apply(a, b, logit_scale, plan)
    return _plain_lse(a, b, logit_scale, plan)


def _check_implementation(implementation: str) -> None:
    if implementation not in ("tiled", "plain"):
        raise ValueError(f"implementation must be tiled or plain, got {implementation!r}")


class _TiledSoftplus(torch.autograd.Function):
    """sum softplus(s*A_i*B_j + b) over the rank's row stripe, block by block (SigLIP).

    Backward recomputes each block; d softplus(x) / dx = sigmoid(x).
    """

    @staticmethod
    def forward(
        ctx: Any, a: Tensor, b: Tensor, logit_scale: Tensor, bias: Tensor | None, plan: _Plan
    ) -> Tensor:
        a_scaled = a * logit_scale.exp()
        shift = 0.0 if bias is None else bias
        total = torch.zeros((), dtype=torch.float64, device=a.device)  # ~N^2 terms: sum in double
        scratch = _Scratch(a, plan, 1)
        for r, c, _, _ in plan.blocks():
            x = plan.logits(a_scaled, b, r, c, scratch(0, r, c)).add_(shift)
            total += F.softplus(x.clamp_(min=_EXP_FLOOR)).sum()  # softplus(-80) < 2e-35
        ctx.plan = plan
        ctx.save_for_backward(a, b, logit_scale, *([] if bias is None else [bias]))
        return total.to(a.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        a, b, logit_scale, *bias = ctx.saved_tensors
        plan: _Plan = ctx.plan
        scale = logit_scale.exp()
        a_scaled = a * scale
        shift = bias[0] if bias else 0.0
        da, db = torch.zeros_like(a), torch.zeros_like(b)
        d_bias = torch.zeros((), dtype=torch.float64, device=a.device)
        scratch = _Scratch(a, plan, 1)
        for r, c, _, _ in plan.blocks():
            x = plan.logits(a_scaled, b, r, c, scratch(0, r, c)).add_(shift)
            g = x.clamp_(_EXP_FLOOR, -_EXP_FLOOR).sigmoid_().mul_(grad)
            da[r].addmm_(g, b[c])
            db[c].addmm_(g.T, a_scaled[r])
            d_bias += g.sum()
        da.mul_(scale)
        d_scale = (a * da).sum().reshape(logit_scale.shape)  # logits - b = s * cos
        d_bias_out = d_bias.to(a.dtype).reshape(bias[0].shape) if bias else None
        return da, db, d_scale, d_bias_out, None


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
    lse_images, lse_texts = _lse(
        images, texts, logit_scale, _Plan(n, span, span, block_size), implementation
    )
    positive = _positives(images, texts, logit_scale, span)
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
        _Plan(n, span, span, block_size),
        _Plan(n, span, None, block_size, exclude_diagonal=True),
    )
    image_texts, text_images = _lse(images, texts, logit_scale, cross, implementation)
    image_images, _ = _lse(images, images, logit_scale, itself, implementation)
    text_texts, _ = _lse(texts, texts, logit_scale, itself, implementation)
    positive = _positives(images, texts, logit_scale, span)
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
    _check_implementation(implementation)
    plan = _Plan(n, span, None, block_size)
    if implementation == "plain" or plan.single_block:
        logits = _biased(logit_scale.exp() * images[start:stop] @ texts.T, logit_bias)  # [n, N]
        labels = -torch.ones_like(logits)
        labels.diagonal(start).fill_(1.0)  # +1 on the pairs (i, i), -1 elsewhere
        return -F.logsigmoid(labels * logits).sum() / (stop - start)
    # -log sigmoid(-x) = softplus(x) for every pair, and -log sigmoid(x) = softplus(x) - x, so
    # the positives only subtract their logits
    all_pairs = _TiledSoftplus.apply(images, texts, logit_scale, logit_bias, plan)
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
    plan = _Plan(n, span, span, block_size, multipliers, exclude_diagonal=True)
    by_image, by_text = _lse(images, texts, logit_scale, plan, implementation)  # negatives only
    positive = _biased(_positives(images, texts, logit_scale, span), logit_bias)
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
    plan = _Plan(n, span, span, block_size)
    lse_images, lse_texts = _lse(images, texts, logit_scale, plan, implementation)
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
