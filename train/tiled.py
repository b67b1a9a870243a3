"""Blockwise ("tiled") computation of the loss's reductions over the N x N logit matrix.

The losses in train/loss.py need, of the logits x_ij = s * <A_i, B_j>, only reductions: each
row's and each column's log-sum-exp (LSE), SigLIP's sum of softplus, or (hinge, on the cosines
themselves) each row's and column's maximum or sum of hinge terms. `lse` gives the LSEs either
    plain   from the materialised [n, N] logits (autograd; they and their gradient: ~n*N floats),
    tiled   block by block with `_TiledLSE`: forward keeps only running row and column LSEs, and
            backward recomputes each block. Memory O(N*D + block^2), same arithmetic plus one
            recompute of the logits. A batch that fits in one block is computed as plain does.
`TiledSoftplus` does the same for SigLIP, `hardest` and `hinge_sums` for the hinge loss. A
`BlockPlan` says which blocks a rank visits; rows-only plans may have K != N columns (a queue).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

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
class BlockPlan:
    """Which blocks of the [N, N] logit matrix s*A*B^T a rank visits, and what it takes there.

    A rank needs the LSE over every column of each of its rows (A's anchors) and, for symmetric
    losses, the LSE over every row of each of its columns (B's anchors): a row stripe and a
    column stripe. With one process both are the whole matrix, and each block is computed once.
    A rows-only plan (cols=None) may have a B of n_cols != N rows: the matrix is [N, n_cols].
    """

    n: int
    rows: Span
    cols: Span | None
    block: int
    multipliers: tuple[float, ...] = (1.0,)
    """LSEs are of m * logits for each m (hard-negative reweighting needs beta and 1 + beta)."""
    exclude_diagonal: bool = False
    """Leave out logit (i, i): the anchor itself (NT-Xent) or its positive (negatives only)."""
    n_cols: int | None = None
    """Columns of the matrix, when they are not the N samples: B is then e.g. a queue of K keys
    (rows-only plans, cols=None). None: n."""

    def __post_init__(self) -> None:
        if self.n_cols is not None and self.cols is not None:
            raise ValueError("BlockPlan: n_cols (extra columns) needs cols=None, a rows-only plan")
        if self.n_cols is not None and self.n_cols < 0:
            raise ValueError(f"BlockPlan: n_cols must be >= 0, got {self.n_cols}")

    @property
    def col_count(self) -> int:
        """Columns of the matrix: n_cols, or n."""
        return self.n if self.n_cols is None else self.n_cols

    def blocks(self) -> Iterator[tuple[slice, slice, bool, bool]]:
        """(row block, column block, in the row stripe, in the column stripe), as needed."""
        for r, r_in in _cut(self.rows, self.n, self.block):
            for c, c_in in _cut(self.cols or (0, 0), self.col_count, self.block):
                if r_in or c_in:
                    yield r, c, r_in, c_in

    def logits(
        self,
        a_rows: Tensor,
        b: Tensor,
        r: slice,
        c: slice,
        out: Tensor,
        pairs: Tensor | None = None,
    ) -> Tensor:
        """Block (r, c) of the logits from a_rows = s * A[r]; on a diagonal block, its diagonal
        (the pairs' logits, before any exclusion) is copied to `pairs` when given."""
        x = torch.mm(a_rows, b[c].T, out=out)  # [br, bc]
        if pairs is not None and self.on_diagonal(r, c):
            pairs[_local(r, self.rows)] = x.diagonal()
        if self.exclude_diagonal:  # global (i, i) sits where column - row == r.start - c.start
            x.diagonal(r.start - c.start).fill_(-math.inf)
        return x

    @property
    def symmetric(self) -> bool:
        """Row and column stripes are the same samples (the losses over image-text pairs): then
        row and column blocks are cut alike and the pairs (i, i) lie on diagonal blocks."""
        return self.cols == self.rows

    def on_diagonal(self, r: slice, c: slice) -> bool:
        return self.symmetric and r == c and self.rows[0] <= r.start < self.rows[1]

    @property
    def width(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], (self.cols[1] - self.cols[0]) if self.cols else 0

    @property
    def single_block(self) -> bool:
        """One block covers everything (N <= block): then tiling has nothing to save, and the
        plain computation, which needs no recompute, is used (its memory is a few block^2)."""
        return sum(1 for _ in self.blocks()) == 1


class _Scratch:
    """Reusable block buffers: a fresh multi-MB tensor per block would page-fault every time.

    Also holds s * A for the current row block only, so that no scaled copy of all of A is made.
    """

    def __init__(self, a: Tensor, plan: BlockPlan, count: int) -> None:
        side, cols_side = min(plan.block, plan.n), min(plan.block, plan.col_count)
        self.flat = [a.new_empty(side * cols_side) for _ in range(count)]
        self.a, self.row_buffer = a, a.new_empty(side, a.shape[1])
        self.row_block: slice | None = None

    def __call__(self, i: int, r: slice, c: slice) -> Tensor:
        rows, cols = r.stop - r.start, c.stop - c.start
        return self.flat[i][: rows * cols].view(rows, cols)

    def scaled_rows(self, r: slice, scale: float) -> Tensor:
        """s * A[r], computed once per row block (blocks() visits row blocks in order)."""
        out = self.row_buffer[: r.stop - r.start]
        if r != self.row_block:
            torch.mul(self.a[r], scale, out=out)
            self.row_block = r
        return out


# torch's CPU exp is ~10x slower on arguments whose result underflows (measured here), and
# large logit scales produce many. Raising exp's argument to this floor changes each term by
# less than e^-80 = 2e-35 of the largest one, far below float32 and float64 resolution.
_EXP_FLOOR = -80.0


def _block_lse(x: Tensor, dim: int, out: Tensor) -> Tensor:
    """logsumexp of x along dim (with `out`, x's shape, as scratch)."""
    top = x.amax(dim, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)  # all -inf: finite
    total = torch.sub(x, top, out=out).clamp_(min=_EXP_FLOOR).exp_().sum(dim)
    return total.log_().add_(top.squeeze(dim))


# On CPU the element-wise passes over a block cost about as much as its matmul. Row and column
# reductions can share one exp pass, shifted by one value for the whole block, when no row's or
# column's largest logit lies more than _SHARED_SPAN below that shift: every sum then keeps
# float's full relative precision, and the floored terms (e^-80 each) change it by at most
# block * e^(80 - _SHARED_SPAN) ~ 1e-14. Checked per block; blocks that fail take the
# direction-by-direction path.
_SHARED_SPAN = 40.0


class _Shared:
    """Whether to try the shared-exp path: CPU only (the checks read values back, which would
    stall a GPU), and not after it has failed twice in one call (very spread-out logits)."""

    def __init__(self, x: Tensor) -> None:
        self.failures = 0 if x.device.type == "cpu" else 2

    @property
    def enabled(self) -> bool:
        return self.failures < 2

    def lse_both(self, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor] | None:
        """(row LSEs, column LSEs) of the block from one exp pass, or None if not precise."""
        top = x.max().item()
        if math.isfinite(top):
            e = torch.sub(x, top, out=out).clamp_(min=_EXP_FLOOR).exp_()
            by_row, by_col = e.sum(1), e.sum(0)
            # a sum of at most `width` terms below e^(max - top): the max is within the span
            floor = math.exp(-_SHARED_SPAN)
            if (
                by_row.min().item() >= x.shape[1] * floor
                and by_col.min().item() >= x.shape[0] * floor
            ):
                return by_row.log_().add_(top), by_col.log_().add_(top)
        self.failures += 1
        return None

    def softmax_sum(
        self, x: Tensor, lse_row: Tensor, w_row: Tensor, lse_col: Tensor, w_col: Tensor, out: Tensor
    ) -> Tensor | None:
        """w_row * P_row + w_col * P_col of the block as exp(x - top) * (u + v), u, v per row
        and column, or None if the LSEs are too spread out for one shift. Overwrites x."""
        top = max(lse_row.max().item(), lse_col.max().item())  # >= every logit of the block
        low = min(lse_row.min().item(), lse_col.min().item())
        if not top - low <= _SHARED_SPAN:  # also catches -inf LSEs (fully excluded lines)
            self.failures += 1
            return None
        u = (top - lse_row).exp_().mul_(w_row)  # [br, 1]: P_row = exp(x - top) * exp(top - lse)
        v = (top - lse_col).exp_().mul_(w_col)  # [1, bc]
        e = torch.sub(x, top, out=x).clamp_(min=_EXP_FLOOR).exp_()
        return torch.add(u, v, out=out).mul_(e)


class Reductions(NamedTuple):
    """What a loss needs of the logits x = s*A*B^T: row and column LSEs of m * x ([K, rows],
    [K, cols] for the plan's K multipliers) and, for symmetric plans, the pairs' logits x_ii of
    the rank's rows ([rows]; empty otherwise) - taken from the blocks, so that no [N, D]
    products (and their gradients) are made for them."""

    rows: Tensor
    cols: Tensor
    pairs: Tensor


class _TiledLSE(torch.autograd.Function):
    """`Reductions` of s*A*B^T, block by block.

    Forward folds each block's LSEs into running ones (log-add-exp) and drops the block. Backward
    recomputes it: the logit gradient is sum_k m_k (g_row * P_row + g_col * P_col) with P the
    softmaxes, which flows to A and B by two matmuls, and to the log scale as <A, dA>, because
    the logits are s * cos and d logits / d log s = logits.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, logit_scale: Tensor, plan: BlockPlan) -> Any:
        scale = logit_scale.exp().item()
        rows = a.new_full((len(plan.multipliers), plan.width[0]), -math.inf)
        cols = a.new_full((len(plan.multipliers), plan.width[1]), -math.inf)
        pairs = a.new_zeros(plan.width[0] if plan.symmetric else 0)
        scratch = _Scratch(a, plan, 3 if len(plan.multipliers) > 1 else 2)
        shared = _Shared(a)
        for r, c, r_in, c_in in plan.blocks():
            x = plan.logits(scratch.scaled_rows(r, scale), b, r, c, scratch(0, r, c), pairs)
            rr, cc = _local(r, plan.rows), _local(c, plan.cols)
            both = None
            if r_in and c_in and plan.multipliers == (1.0,) and shared.enabled:
                both = shared.lse_both(x, scratch(1, r, c))
            if both is not None:
                rows[0, rr] = torch.logaddexp(rows[0, rr], both[0])
                cols[0, cc] = torch.logaddexp(cols[0, cc], both[1])
                continue
            for k, m in enumerate(plan.multipliers):
                xm = x if m == 1 else torch.mul(x, m, out=scratch(2, r, c))
                if r_in:
                    rows[k, rr] = torch.logaddexp(rows[k, rr], _block_lse(xm, 1, scratch(1, r, c)))
                if c_in:
                    cols[k, cc] = torch.logaddexp(cols[k, cc], _block_lse(xm, 0, scratch(1, r, c)))
        ctx.plan = plan
        ctx.save_for_backward(a, b, logit_scale, rows, cols)
        return rows, cols, pairs

    @staticmethod
    def backward(ctx: Any, g_rows: Tensor, g_cols: Tensor, g_pairs: Tensor) -> Any:
        a, b, logit_scale, lse_rows, lse_cols = ctx.saved_tensors
        plan: BlockPlan = ctx.plan
        scale = logit_scale.exp().item()
        # a gradient not needed costs no matmul (a queue's B has none); the log scale's needs dA
        needs = ctx.needs_input_grad
        da = torch.zeros_like(a) if needs[0] or needs[2] else None
        db = torch.zeros_like(b) if needs[1] else None
        scratch = _Scratch(a, plan, 2 if len(plan.multipliers) == 1 else 4)
        shared = _Shared(a)
        for r, c, r_in, c_in in plan.blocks():
            a_scaled = scratch.scaled_rows(r, scale)
            x = plan.logits(a_scaled, b, r, c, scratch(0, r, c))
            rr, cc = _local(r, plan.rows), _local(c, plan.cols)
            terms = []  # (multiplier, final LSE, d loss / d LSE), broadcast over the block
            for k, m in enumerate(plan.multipliers):
                terms += [(m, lse_rows[k, rr, None], g_rows[k, rr, None])] if r_in else []
                terms += [(m, lse_cols[k, None, cc], g_cols[k, None, cc])] if c_in else []
            g = None
            if len(terms) == 2 and plan.multipliers == (1.0,) and shared.enabled:
                g = shared.softmax_sum(x, *terms[0][1:], *terms[1][1:], scratch(1, r, c))
            if g is None:
                g = _logit_grad(x, terms, *(scratch(i, r, c) for i in range(1, len(scratch.flat))))
            if plan.on_diagonal(r, c):
                g.diagonal().add_(g_pairs[rr])
            if da is not None:
                da[r].addmm_(g, b[c])
            if db is not None:
                db[c].addmm_(g.T, a_scaled)
        if da is None:
            return None, db, None, None
        da.mul_(scale)
        d_scale = torch.dot(a.flatten(), da.flatten())  # <A, dA>: no [N, D] temporary
        return da, db, d_scale.reshape(logit_scale.shape), None


def _logit_grad(x: Tensor, terms: list[tuple[float, Tensor, Tensor]], *scratch: Tensor) -> Tensor:
    """One block's d loss / d logits: sum of m * weight * softmax, softmax = exp(m*x - LSE).

    With one multiplier (every loss but hard_negative) one scratch buffer suffices: the last
    term's softmax is computed in x's own buffer, which is not needed after it.
    """
    g: Tensor | None = None
    for i, (m, lse, weight) in enumerate(terms):
        last = i == len(terms) - 1
        if m == 1:
            target = x if last and g is not None else scratch[0] if g is None else scratch[1]
            p = torch.sub(x, lse, out=target)
        else:  # x must survive all terms: m*x goes to its own buffer
            p = torch.sub(torch.mul(x, m, out=scratch[2]), lse, out=scratch[0 if g is None else 1])
        p = p.clamp_(min=_EXP_FLOOR).exp_()
        g = p.mul_(m * weight) if g is None else g.addcmul_(p, m * weight)
    assert g is not None, "every block of the plan is in a row or a column stripe"
    return g


def _plain_stripes(a: Tensor, b: Tensor, plan: BlockPlan) -> tuple[Tensor, Tensor | None, Tensor]:
    """The plan's row stripe [n, N] and column stripe [N, n] (None without cols) of A*B^T,
    materialised with autograd (excluded entries -inf), and the pairs' entries (or empty)."""
    n, (start, stop) = plan.n, plan.rows
    pairs = a.new_zeros(0)

    def logits(r: Span, c: Span) -> Tensor:
        nonlocal pairs
        x = a[r[0] : r[1]] @ b[c[0] : c[1]].T
        if plan.symmetric and r == plan.rows and c == (0, n):
            pairs = x[:, start:stop].diagonal()
        if plan.exclude_diagonal:
            i = torch.arange(r[0], r[1], device=x.device)[:, None]
            x = x.masked_fill(i == torch.arange(c[0], c[1], device=x.device), -math.inf)
        return x

    by_row = logits(plan.rows, (0, plan.col_count))  # [n, N] (or [n, n_cols])
    if plan.cols is None:
        return by_row, None, pairs
    one_process = plan.rows == plan.cols == (0, n)  # then the columns are the same matrix
    return by_row, by_row if one_process else logits((0, n), plan.cols), pairs  # [N, n]


def _plain_lse(a: Tensor, b: Tensor, logit_scale: Tensor, plan: BlockPlan) -> Reductions:
    """The same as `_TiledLSE` from materialised [n, N] and [N, n] logits (autograd)."""
    by_row, by_col, pairs = _plain_stripes(a * logit_scale.exp(), b, plan)

    def reduce(x: Tensor, dim: int) -> Tensor:
        return torch.stack([(x if m == 1 else m * x).logsumexp(dim) for m in plan.multipliers])

    if by_col is None:
        return Reductions(reduce(by_row, 1), by_row.new_empty(len(plan.multipliers), 0), pairs)
    return Reductions(reduce(by_row, 1), reduce(by_col, 0), pairs)


def lse(
    a: Tensor, b: Tensor, logit_scale: Tensor, plan: BlockPlan, implementation: str
) -> Reductions:
    """The plan's `Reductions` of s*A*B^T, computed the way `implementation` says."""
    check_implementation(implementation)
    if implementation == "tiled" and not plan.single_block:
        return Reductions(*_TiledLSE.apply(a, b, logit_scale, plan))
    return _plain_lse(a, b, logit_scale, plan)


def check_implementation(implementation: str) -> None:
    if implementation not in ("tiled", "plain"):
        raise ValueError(f"implementation must be tiled or plain, got {implementation!r}")


class TiledSoftplus(torch.autograd.Function):
    """sum softplus(s*A_i*B_j + b) over the rank's row stripe, block by block (SigLIP).

    Backward recomputes each block; d softplus(x) / dx = sigmoid(x).
    """

    @staticmethod
    def forward(
        ctx: Any, a: Tensor, b: Tensor, logit_scale: Tensor, bias: Tensor | None, plan: BlockPlan
    ) -> Tensor:
        scale = logit_scale.exp().item()
        shift = 0.0 if bias is None else bias
        total = torch.zeros((), dtype=torch.float64, device=a.device)  # ~N^2 terms: sum in double
        scratch = _Scratch(a, plan, 1)
        for r, c, _, _ in plan.blocks():
            x = plan.logits(scratch.scaled_rows(r, scale), b, r, c, scratch(0, r, c)).add_(shift)
            total += F.softplus(x.clamp_(min=_EXP_FLOOR)).sum()  # softplus(-80) < 2e-35
        ctx.plan = plan
        ctx.save_for_backward(a, b, logit_scale, *([] if bias is None else [bias]))
        return total.to(a.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        a, b, logit_scale, *bias = ctx.saved_tensors
        plan: BlockPlan = ctx.plan
        scale = logit_scale.exp().item()
        shift = bias[0] if bias else 0.0
        da, db = torch.zeros_like(a), torch.zeros_like(b)
        d_bias = torch.zeros((), dtype=torch.float64, device=a.device)
        scratch = _Scratch(a, plan, 1)
        for r, c, _, _ in plan.blocks():
            a_scaled = scratch.scaled_rows(r, scale)
            x = plan.logits(a_scaled, b, r, c, scratch(0, r, c)).add_(shift)
            g = x.clamp_(_EXP_FLOOR, -_EXP_FLOOR).sigmoid_().mul_(grad)
            da[r].addmm_(g, b[c])
            db[c].addmm_(g.T, a_scaled)
            d_bias += g.sum()
        da.mul_(scale)
        d_scale = torch.dot(a.flatten(), da.flatten())  # logits - b = s * cos
        d_bias_out = d_bias.to(a.dtype).reshape(bias[0].shape) if bias else None
        return da, db, d_scale, d_bias_out, None


# The hinge loss's reductions are of the cosines x = A*B^T themselves: no scale, and no LSE.


def hardest(a: Tensor, b: Tensor, plan: BlockPlan, implementation: str) -> tuple[Tensor, Tensor]:
    """The largest entry of A*B^T in each row of the row stripe and each column of the column
    stripe ([rows], [cols]; with exclude_diagonal, the hardest negatives), with autograd.

    A max's gradient reaches only its argmax. Tiled finds the argmaxes block by block without
    gradient and recomputes just those entries as dot products, so autograd sends the gradient
    there and nowhere else: O(N*D + block^2) memory, no backward pass over the blocks. Ties go to
    the lowest index in both implementations: torch.max takes a line's first maximum, and a later
    block replaces the running maximum only with a strictly larger one.
    """
    check_implementation(implementation)
    if implementation == "plain" or plan.single_block:
        by_row, by_col, _ = _plain_stripes(a, b, plan)
        cols = by_row.new_empty(0) if by_col is None else by_col.max(0).values
        return by_row.max(1).values, cols
    row_argmax, col_argmax = _argmax_lines(a, b, plan)
    (start, stop), (c_start, c_stop) = plan.rows, plan.cols or (0, 0)
    rows = (a[start:stop] * b[row_argmax]).sum(-1)  # [n]
    return rows, (a[col_argmax] * b[c_start:c_stop]).sum(-1)


@torch.no_grad()
def _argmax_lines(a: Tensor, b: Tensor, plan: BlockPlan) -> tuple[Tensor, Tensor]:
    """Global column index of each stripe row's maximum, and row index of each column's."""
    best = [a.new_full((w,), -math.inf) for w in plan.width]
    argmax = [torch.zeros(w, dtype=torch.long, device=a.device) for w in plan.width]

    def keep_larger(side: int, line: slice, value: Tensor, index: Tensor) -> None:
        larger = value > best[side][line]  # strictly: a tie keeps the earlier, lower index
        best[side][line] = torch.where(larger, value, best[side][line])
        argmax[side][line] = torch.where(larger, index, argmax[side][line])

    scratch = _Scratch(a, plan, 1)
    for r, c, r_in, c_in in plan.blocks():  # row blocks in order, and columns within each
        x = plan.logits(a[r], b, r, c, scratch(0, r, c))
        if r_in:
            value, index = x.max(1)
            keep_larger(0, _local(r, plan.rows), value, index + c.start)
        if c_in:
            value, index = x.max(0)
            keep_larger(1, _local(c, plan.cols), value, index + r.start)
    return argmax[0], argmax[1]


def hinge_sums(
    a: Tensor,
    b: Tensor,
    row_shift: Tensor,
    col_shift: Tensor,
    plan: BlockPlan,
    implementation: str,
) -> tuple[Tensor, Tensor]:
    """sum_j relu(row_shift_i + x_ij) for each row i of the row stripe and sum_i relu(col_shift_j
    + x_ij) for each column j of the column stripe, x = A*B^T ([rows], [cols]; an excluded
    diagonal entry adds nothing). row_shift [rows], col_shift [cols] get gradients too."""
    check_implementation(implementation)
    if implementation == "plain" or plan.single_block:
        by_row, by_col, _ = _plain_stripes(a, b, plan)
        rows = F.relu(by_row + row_shift[:, None]).sum(1)
        return rows, by_row.new_empty(0) if by_col is None else F.relu(by_col + col_shift).sum(0)
    return _TiledHingeSums.apply(a, b, row_shift, col_shift, plan)


class _TiledHingeSums(torch.autograd.Function):
    """`hinge_sums` block by block. d relu(u) / du is the indicator u > 0: backward recomputes
    each block's indicators, weighted by the incoming gradient, and sends them to A and B by two
    matmuls and to each shift as its line's sum (the count of active hinges)."""

    @staticmethod
    def forward(
        ctx: Any, a: Tensor, b: Tensor, row_shift: Tensor, col_shift: Tensor, plan: BlockPlan
    ) -> Any:
        rows, cols = a.new_zeros(plan.width[0]), a.new_zeros(plan.width[1])
        scratch = _Scratch(a, plan, 2)
        for r, c, r_in, c_in in plan.blocks():
            x = plan.logits(a[r], b, r, c, scratch(0, r, c))  # excluded entries: -inf, relu 0
            rr, cc = _local(r, plan.rows), _local(c, plan.cols)
            if r_in:
                hinge = torch.add(x, row_shift[rr, None], out=scratch(1, r, c)).clamp_(min=0)
                rows[rr] += hinge.sum(1)
            if c_in:
                hinge = torch.add(x, col_shift[None, cc], out=scratch(1, r, c)).clamp_(min=0)
                cols[cc] += hinge.sum(0)
        ctx.plan = plan
        ctx.save_for_backward(a, b, row_shift, col_shift)
        return rows, cols

    @staticmethod
    def backward(ctx: Any, g_rows: Tensor, g_cols: Tensor) -> Any:
        a, b, row_shift, col_shift = ctx.saved_tensors
        plan: BlockPlan = ctx.plan
        da, db = torch.zeros_like(a), torch.zeros_like(b)
        d_row_shift, d_col_shift = torch.zeros_like(row_shift), torch.zeros_like(col_shift)
        scratch = _Scratch(a, plan, 3)
        for r, c, r_in, c_in in plan.blocks():
            x = plan.logits(a[r], b, r, c, scratch(0, r, c))
            rr, cc = _local(r, plan.rows), _local(c, plan.cols)
            g = scratch(1, r, c).zero_()  # d loss / d x of the block
            if r_in:
                active = torch.add(x, row_shift[rr, None], out=scratch(2, r, c)).gt_(0)  # 1 or 0
                g.addcmul_(active, g_rows[rr, None])
                d_row_shift[rr] += active.sum(1) * g_rows[rr]
            if c_in:
                active = torch.add(x, col_shift[None, cc], out=scratch(2, r, c)).gt_(0)
                g.addcmul_(active, g_cols[None, cc])
                d_col_shift[cc] += active.sum(0) * g_cols[cc]
            da[r].addmm_(g, b[c])
            db[c].addmm_(g.T, a[r])
        return da, db, d_row_shift, d_col_shift, None
