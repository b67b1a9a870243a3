"""The CLIP loss against a plain loop reference, and its temperature gradient."""

import math

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from train.loss import clip_loss


def loop_reference(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor):
    """CLIP's loss written out term by term: mean over i of -log softmax, both directions."""
    n = images.shape[0]
    scale = logit_scale.exp()
    total = images.new_zeros(())
    for i in range(n):
        row = torch.stack([scale * images[i] @ texts[j] for j in range(n)])
        col = torch.stack([scale * texts[i] @ images[j] for j in range(n)])
        total = total - torch.log_softmax(row, 0)[i] - torch.log_softmax(col, 0)[i]
    return total / (2 * n)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_matches_loop_reference_values_and_gradients():
    images = unit(7, 5, 0).requires_grad_()
    texts = unit(7, 5, 1).requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    ours = clip_loss(images, texts, images, texts, scale)
    ours_grads = torch.autograd.grad(ours, (images, texts, scale))
    ref = loop_reference(images, texts, scale)
    ref_grads = torch.autograd.grad(ref, (images, texts, scale))
    assert_close(ours, ref)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert_close(a, b)


def test_perfect_alignment_gives_low_loss_and_shuffled_gives_high():
    x = unit(16, 8, 2)
    scale = torch.tensor(math.log(100.0), dtype=torch.float64)
    aligned = clip_loss(x, x, x, x, scale)
    shuffled = clip_loss(x, x.roll(1, 0), x, x.roll(1, 0), scale)
    assert aligned < 0.5 < math.log(16) < shuffled


def test_temperature_gradient_matches_finite_difference():
    images, texts = unit(6, 4, 3), unit(6, 4, 4)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(clip_loss(images, texts, images, texts, scale), scale)
    eps = 1e-6
    up = clip_loss(images, texts, images, texts, scale.detach() + eps)
    down = clip_loss(images, texts, images, texts, scale.detach() - eps)
    assert_close(grad, (up - down) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_rank_losses_average_to_the_global_loss():
    """Rows split over two 'ranks' (with offsets) average to the one-process loss."""
    images, texts = unit(8, 4, 5), unit(8, 4, 6)
    scale = torch.tensor(1.5, dtype=torch.float64)
    full = clip_loss(images, texts, images, texts, scale)
    parts = [
        clip_loss(
            images[r * 4 : (r + 1) * 4],
            texts[r * 4 : (r + 1) * 4],
            images,
            texts,
            scale,
            row_offset=r * 4,
        )
        for r in range(2)
    ]
    assert_close((parts[0] + parts[1]) / 2, full)
