"""How the training step computes: precision (autocast, fp16 loss scaling) and speed switches.

Weights, gradients and optimizer state stay float32 in every precision; autocast runs the towers'
matmuls and convolutions in bf16/fp16, and the loss is computed in float32
(`train.objective.features_loss`). fp16's narrow range needs a loss scale: `torch.amp.GradScaler`
multiplies the loss before backward and divides the gradients before the optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from common.model import DualEncoder
from train.config import ComputeConfig

log = logging.getLogger(__name__)

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The autocast dtype of the forward pass and, for fp16, the gradient scaler."""

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"compute.precision: unknown precision {precision!r}")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError(
                f"compute.precision: fp16 needs a CUDA device (this run is on {device.type}); "
                "use bf16 on CPU"
            )
        self.name = precision
        self.device = device
        self.dtype: torch.dtype | None = _DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the model's forward runs in (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: multiplied by the loss scale for fp16."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (before clipping and the finite check)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step of a step whose gradients were found finite on every rank."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def skip(self) -> None:
        """A step skipped for non-finite gradients: fp16 backs its loss scale off.

        The new scale is set explicitly rather than from the scaler's own per-rank inf check,
        so that ranks holding different gradient shards (FSDP) keep the same scale.
        """
        if self.scaler is not None:
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.scaler is None else self.scaler.get_scale()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (scale, growth tracker); empty without one."""
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def has_conv_image_tower(model: DualEncoder) -> bool:
    """A convolutional image tower (ResNet, ConvNeXt...), not a ViT with a patch convolution."""
    visual = model.clip.visual
    return not isinstance(visual, VisionTransformer) and any(
        isinstance(m, nn.Conv2d) for m in visual.modules()
    )


def uses_channels_last(model: DualEncoder, cfg: ComputeConfig, device: torch.device) -> bool:
    """Channels-last pays off for convolutions on GPU (cuDNN's NHWC kernels), nowhere else."""
    return cfg.channels_last and device.type == "cuda" and has_conv_image_tower(model)


def prepare_model(model: DualEncoder, cfg: ComputeConfig, device: torch.device) -> None:
    """Apply the speed switches to the (unwrapped) model in place, before DDP/FSDP wrapping."""
    if cfg.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    if uses_channels_last(model, cfg, device):
        model.clip.visual.to(memory_format=torch.channels_last)
    if cfg.compile:
        # in place: the module keeps its class and state-dict keys (no `_orig_mod.` prefix),
        # so checkpoints and the exported artifact are the same with and without compile
        model.compile()
    log.info(
        "compute: grad checkpointing %s, channels-last %s, compile %s",
        cfg.grad_checkpointing,
        uses_channels_last(model, cfg, device),
        cfg.compile,
    )
