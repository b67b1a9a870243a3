"""Non-finite losses and gradients: every rank skips the same steps, counts them, stops after K.

A NaN or inf step must never reach the weights, and the decision to skip must be the same on
every rank: a rank that stepped while another skipped would diverge silently, and one that
entered a collective the others skipped would hang. So the decision is made from values reduced
over all ranks (the global loss and a global non-finite flag), in one all-reduce per step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from train.distributed import DistInfo

log = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP (DTensor) parameter or gradient; a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients, clipping them to `max_norm` first if it is > 0.

    With FSDP the norm is over every rank's shards (replicated, unsharded parameters counted
    once); a non-finite gradient anywhere gives a non-finite norm.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    squares = [torch.nn.utils.get_total_norm(whole).float() ** 2] if whole else []
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)  # a DTensor: this rank's partial norm
        full = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares.append(full.float() ** 2)
    if not squares:
        return torch.zeros(())
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            _local(g).mul_(coef.to(g.device))
    return total


def model_is_finite(model: nn.Module, info: DistInfo) -> bool:
    """True when every parameter is finite on every rank (a collective when distributed)."""
    bad = torch.zeros((), device=info.device)
    for param in model.parameters():
        bad += (~torch.isfinite(_local(param.detach()))).sum().to(bad.device)
    if info.enabled:
        dist.all_reduce(bad)
    return bad.item() == 0


class NonFiniteGuard:
    """Decides, identically on every rank, whether a step may update the weights.

    A non-finite loss, or non-finite gradients in fp32/bf16, skip the step and count in
    `skipped`; `max_consecutive` of them in a row raise FloatingPointError naming the steps.
    In fp16 non-finite gradients with a finite loss are the loss scale overflowing: the scaler
    backs off and the step is counted in `loss_scale_skipped`, not as a failure.
    """

    def __init__(self, max_consecutive: int, info: DistInfo, *, scaled_fp16: bool) -> None:
        self.max_consecutive = max_consecutive
        self.info = info
        self.scaled_fp16 = scaled_fp16
        self.skipped = 0
        self.loss_scale_skipped = 0
        self.consecutive = 0

    def check(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        """(the global mean loss, whether step `step` may update the weights), the same on
        every rank; raises after too many non-finite steps in a row."""
        bad_grads = (~torch.isfinite(grad_norm)).float().to(loss.device)
        reduced = torch.stack([loss.detach().float(), bad_grads])
        if self.info.enabled:
            dist.all_reduce(reduced)
        global_loss = reduced[0] / self.info.world_size
        loss_finite = bool(torch.isfinite(global_loss))  # one host sync per step
        grads_finite = reduced[1].item() == 0
        ok = loss_finite and grads_finite
        if ok:
            self.consecutive = 0
        elif loss_finite and self.scaled_fp16:
            self.loss_scale_skipped += 1
        else:
            self._count(step, global_loss.item(), grads_finite)
        return global_loss, ok

    def _count(self, step: int, loss: float, grads_finite: bool) -> None:
        self.skipped += 1
        self.consecutive += 1
        what = f"loss {loss}" if grads_finite else f"gradients (loss {loss})"
        log.warning(
            "step %d: non-finite %s: step skipped (%d in a row, %d in all)",
            step,
            what,
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"non-finite loss or gradients in {self.consecutive} consecutive steps "
                f"({step - self.consecutive + 1}..{step}, optim.max_consecutive_nonfinite="
                f"{self.max_consecutive}): stopping. Lower optim.lr, set optim.grad_clip_norm, "
                "or train in bf16 instead of fp16; checkpoints/last-good.pt, if written, is the "
                "checkpoint before the first non-finite step (resume with --resume PATH)."
            )
