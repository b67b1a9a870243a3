"""Contrastive losses over L2-normalised features: pure tensor code, no process-group logic."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_image_features: torch.Tensor,
    all_text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    row_offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE for this process's rows against every column of the global batch.

    image_features, text_features: [n, D] this rank's features (unit vectors).
    all_*_features: [N, D] the global batch, this rank's rows at row_offset..row_offset+n.
    logit_scale: log of the inverse temperature (learned); logits = exp(logit_scale) * cos.

    Each rank averages over its own n rows, so with world size W the rank losses average to the
    global loss, and the gradients that DDP averages over ranks equal the global loss's gradient
    (the gather's backward sums every rank's contribution to each feature; see distributed.py).
    With one process (all_* is the same tensor, offset 0) this is CLIP's loss over the N x N logits.
    """
    scale = logit_scale.exp()
    labels = torch.arange(image_features.shape[0], device=image_features.device) + row_offset
    logits_per_image = scale * image_features @ all_text_features.T  # [n, N]
    logits_per_text = scale * text_features @ all_image_features.T  # [n, N]
    return 0.5 * (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    )
