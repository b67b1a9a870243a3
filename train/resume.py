"""What a resumed run takes from its checkpoint, and what from the command line.

The checkpoint's weights, optimizer moments, step, RNG and data position always win. Config
fields split three ways:
- fixed: they describe the checkpoint's state itself (the model, how its optimizer state is laid
  out, the seed and initial values it started from); a change is refused, since the restored
  state would silently undo it.
- applied: the optimizer's hyperparameters and the schedule (lr, betas, eps, weight decay,
  warmup, steps), which the restored optimizer and scheduler state would otherwise override;
  they are written into the restored state and the change is logged.
- everything else is read from the config as the run goes, so the new value simply holds.
config.json is then written from the config that runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.config import to_dict
from train.config import TrainConfig

log = logging.getLogger(__name__)

FIXED = (
    "model.",
    "compute.parallel",
    "seed",
    "loss.init_temperature",
    "loss.siglip_init_temperature",
    "loss.siglip_init_logit_bias",
)
APPLIED = (
    "optim.lr",
    "optim.beta1",
    "optim.beta2",
    "optim.eps",
    "optim.weight_decay",
    "optim.warmup_steps",
    "steps",
)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (checkpoint's value, this run's value)} for every field that differs.

    A field the checkpoint lacks (added to the code since) counts as its default value.
    """
    before = {**_flat(to_dict(TrainConfig())), **_flat(saved)}
    after = _flat(to_dict(cfg))
    return {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}


def check_changes(changes: dict[str, tuple[Any, Any]], path: Path) -> None:
    """Refuse changes of fixed fields; log the others. Raises ValueError naming them all."""
    fixed = [k for k in changes if k.startswith(FIXED)]
    if "loss.kind" in changes and "siglip" in changes["loss.kind"]:
        fixed.append("loss.kind")  # SigLIP's model has a learned bias the others lack
    if fixed:
        listed = ", ".join(f"{k}={changes[k][1]!r} (checkpoint: {changes[k][0]!r})" for k in fixed)
        raise ValueError(
            f"cannot resume {path} with {listed}: the checkpoint's state would undo the change; "
            "drop the override, or start a new run (another run_dir) from its weights"
        )
    for name, (old, new) in changes.items():
        how = "applied to the restored optimizer/schedule" if name in APPLIED else "in effect"
        log.info("resume: %s changed %r -> %r (%s)", name, old, new, how)


def apply_optimizer_changes(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    saved: dict[str, Any],
    cfg: TrainConfig,
) -> None:
    """Write this run's optim.* values over the restored optimizer state and rebuild the lr.

    Groups keep their ratio to optim.lr (a group at half the lr stays at half), and only groups
    that had the configured weight decay get the new one (the no-decay group keeps 0). The
    schedule's shape comes from this run's warmup_steps and steps (the scheduler was built from
    them); the restored step count places the run on it.
    """
    old, new = saved["optim"], cfg.optim
    lr_ratio = new.lr / old["lr"]
    for group in optimizer.param_groups:
        group["betas"] = (new.beta1, new.beta2)
        group["eps"] = new.eps
        if group["weight_decay"] and group["weight_decay"] == old["weight_decay"]:
            group["weight_decay"] = new.weight_decay
    scheduler.base_lrs = [base * lr_ratio for base in scheduler.base_lrs]
    lambdas: list[Callable[[int], float]] = scheduler.lr_lambdas
    groups = optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
    log.info(
        "resume: lr schedule rebuilt (lr %g, warmup %d, %d steps): lr %g at step %d",
        new.lr,
        new.warmup_steps,
        cfg.steps,
        optimizer.param_groups[0]["lr"],
        scheduler.last_epoch,
    )


def needs_optimizer_changes(changes: dict[str, tuple[Any, Any]]) -> bool:
    return any(name in APPLIED for name in changes)
