"""The contrastive losses against plain loop references, tiled against plain, and rank splits."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from train import tiled
from train.config import LOSS_KINDS, LossConfig
from train.loss import (
    DEFAULT_BLOCK_SIZE,
    caption_labels,
    clip_loss,
    debiased_loss,
    hard_negative_loss,
    hinge_loss,
    multi_positive_loss,
    nt_xent_loss,
    rank_loss,
    reference_clip_loss,
    siglip_loss,
)

F64 = torch.float64


# --- references: each loss written out anchor by anchor, straight from its paper -------------
# (CLIP's is train.loss.reference_clip_loss, its definition; the worked example checks it)


def loop_nt_xent(images, texts, logit_scale, bias=None):
    """SimCLR: z = [images; texts]; anchor k against all others, positive = its pair."""
    z = torch.cat([images, texts])
    n2 = z.shape[0]
    total = z.new_zeros(())
    for k in range(n2):
        others = [m for m in range(n2) if m != k]
        logits = torch.stack([logit_scale.exp() * z[k] @ z[m] for m in others])
        total = total - torch.log_softmax(logits, 0)[others.index((k + n2 // 2) % n2)]
    return total / n2


def loop_siglip(images, texts, logit_scale, bias):
    """big_vision's SigLIP: -sum log sigmoid(label * logit) over all pairs / batch size."""
    n = images.shape[0]
    total = images.new_zeros(())
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            logit = logit_scale.exp() * images[i] @ texts[j] + bias
            total = total - F.logsigmoid(label * logit)
    return total / n


def loop_debiased(images, texts, logit_scale, bias=None, *, tau_plus, beta=None):
    """Chuang et al. / Robinson et al.'s estimator, as in their code, both directions."""
    n = images.shape[0]
    scale = logit_scale.exp()
    total = images.new_zeros(())
    for anchors, candidates in ((images, texts), (texts, images)):
        for i in range(n):
            pos = torch.exp(scale * anchors[i] @ candidates[i])
            neg = torch.stack(
                [torch.exp(scale * anchors[i] @ candidates[j]) for j in range(n) if j != i]
            )
            m = n - 1
            if beta is None:
                neg_sum = neg.sum()
            else:
                importance = neg**beta
                neg_sum = (importance * neg).sum() / importance.mean()
            ng = (-tau_plus * m * pos + neg_sum) / (1 - tau_plus)
            ng = torch.maximum(ng, m * torch.exp(-scale))  # cos >= -1
            total = total - torch.log(pos / (pos + ng))
    return total / (2 * n)


def loop_multi_positive(images, texts, logit_scale, labels):
    """SupCon's L_out: mean of -log softmax over the anchor's positives, both directions."""
    n = images.shape[0]
    scale = logit_scale.exp()
    total = images.new_zeros(())
    for anchors, candidates in ((images, texts), (texts, images)):
        for i in range(n):
            log_p = torch.log_softmax(
                torch.stack([scale * anchors[i] @ candidates[j] for j in range(n)]), 0
            )
            positives = [j for j in range(n) if labels[j] == labels[i]]
            total = total - sum(log_p[j] for j in positives) / len(positives)
    return total / (2 * n)


def loop_hinge(images, texts, logit_scale, bias=None, *, margin, reduction):
    """VSE++ (reduction max) and VSE0 (sum): pair i's hinges against every j != i, both ways."""
    n = images.shape[0]
    total = images.new_zeros(())
    for i in range(n):
        by_image, by_text = [], []
        for j in range(n):
            if j != i:
                by_image.append(F.relu(margin - images[i] @ texts[i] + images[i] @ texts[j]))
                by_text.append(F.relu(margin - images[i] @ texts[i] + images[j] @ texts[i]))
        for hinges in (torch.stack(by_image), torch.stack(by_text)):
            total = total + (hinges.max() if reduction == "max" else hinges.sum())
    return total / n


LABELS_7 = torch.tensor([0, 1, 0, 2, 3, 1, 0])  # three samples share caption 0, two caption 1

# name -> (our function with its hyperparameters, the reference)
CASES = {
    "clip": (clip_loss, lambda i, t, s, b: reference_clip_loss(i, t, s)),
    "nt_xent": (nt_xent_loss, loop_nt_xent),
    "siglip": (siglip_loss, loop_siglip),
    "debiased": (
        lambda *a, **k: debiased_loss(*a, tau_plus=0.1, **k),
        lambda *a: loop_debiased(*a, tau_plus=0.1),
    ),
    "hard_negative": (
        lambda *a, **k: hard_negative_loss(*a, tau_plus=0.1, beta=0.5, **k),
        lambda *a: loop_debiased(*a, tau_plus=0.1, beta=0.5),
    ),
    "multi_positive": (
        lambda *a, **k: multi_positive_loss(*a, labels=LABELS_7, **k),
        lambda i, t, s, b: loop_multi_positive(i, t, s, LABELS_7),
    ),
    "hinge": (  # LossConfig's defaults
        lambda *a, **k: hinge_loss(*a, margin=0.2, reduction="max", **k),
        lambda *a: loop_hinge(*a, margin=0.2, reduction="max"),
    ),
    "hinge_sum": (
        lambda *a, **k: hinge_loss(*a, margin=0.2, reduction="sum", **k),
        lambda *a: loop_hinge(*a, margin=0.2, reduction="sum"),
    ),
}


def unit(n: int, d: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=-1).to(dtype)


def leaves(n: int, d: int, seed: int, dtype=F64, log_scale: float = 1.7, bias: float = -2.0):
    """images, texts, logit_scale, logit_bias: differentiable leaves."""
    return (
        unit(n, d, seed, dtype).requires_grad_(),
        unit(n, d, seed + 1, dtype).requires_grad_(),
        torch.tensor(log_scale, dtype=dtype, requires_grad=True),
        torch.tensor(bias, dtype=dtype, requires_grad=True),
    )


def value_and_grads(loss_fn, inputs, **kwargs):
    loss = loss_fn(*inputs, **kwargs)
    return loss, torch.autograd.grad(loss, inputs, allow_unused=True)


def zero_if_none(grads, inputs):
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


# --- every variant against its reference ---------------------------------------------------


# tiled, block 3: 7 rows cut unevenly; block 1024: one block, computed as plain computes it
@pytest.mark.parametrize(
    "implementation, block_size", [("plain", 1024), ("tiled", 3), ("tiled", 1024)]
)
@pytest.mark.parametrize("kind", list(CASES))
def test_each_loss_matches_its_loop_reference(kind, implementation, block_size):
    ours_fn, ref_fn = CASES[kind]
    inputs = leaves(7, 5, seed=0)  # 7 is not a multiple of the block size 3
    ours, ours_grads = value_and_grads(
        ours_fn, inputs, implementation=implementation, block_size=block_size
    )
    ref, ref_grads = value_and_grads(ref_fn, inputs)
    assert_close(ours, ref)
    for a, b in zip(zero_if_none(ours_grads, inputs), zero_if_none(ref_grads, inputs), strict=True):
        assert_close(a, b)


def test_worked_example_by_hand():
    """Three pairs of 2-D vectors, cosine similarity, tau = 1 (logit_scale = log 1 = 0).

    z1 = [1, 2], z2 = [3, 1], z3 = [2, 3]; z1+ = 0.9 z1 and z3+ = 0.9 z3 point the same way as
    their anchors, z2+ = [2.8, 0.9] almost. Cosines cos(z_i, z_j+), e.g. cos(z1, z2+) =
    (2.8 + 1.8) / (sqrt 5 * sqrt 8.65) = 0.699463:
        z1: 1,        0.699463, 0.992278
        z2: 0.707107, 0.999942, 0.789352
        z3: 0.992278, 0.782705, 1
    image->text, row i: log(sum_j e^cos_ij) - cos_ii:
        log(2.718282 + 2.012665 + 2.697372) - 1        = 2.005300 - 1        = 1.005300
        log(2.028115 + 2.718124 + 2.201959) - 0.999942 = 1.938481 - 0.999942 = 0.938539
        log(2.697372 + 2.187371 + 2.718282) - 1        = 2.028546 - 1        = 1.028546
    text->image, column j: 1.007378, 0.934206, 1.030463 (same sums over columns).
    CLIP = (2.972385 / 3 + 2.972047 / 3) / 2 = 0.990739.
    NT-Xent adds the same-modality cosines cos(z1, z2) = 0.707107, cos(z1, z3) = 0.992278,
    cos(z2, z3) = 0.789352, cos(z1+, z2+) = 0.699463, cos(z1+, z3+) = 0.992278,
    cos(z2+, z3+) = 0.782705. Anchor z1: log(2.028115 + 2.697372 + 2.718282 + 2.012665 +
    2.697372) - 1 = 1.497640; z2: 1.414030; z3: 1.525917; z1+: 1.497640 (the same five
    cosines); z2+: log(2.012665 + 2.718124 + 2.187371 + 2.012665 + 2.187371) - 0.999942 =
    1.408641; z3+: 1.525917. NT-Xent = 8.869785 / 6 = 1.478298.
    The hinge loss with margin 0.3 (on cosines, so for any tau): pair 1's image meets its
    hardest negative z3+ at 0.992278, 0.3 - 1 + 0.992278 = 0.292278, and its text z3, 0.292278;
    pair 2: 0.3 - 0.999942 + 0.789352 = 0.089410 and 0.082763 (z3+, z3); pair 3: 0.292278 twice.
    Max = 1.341285 / 3 = 0.447095. Sum adds the other positive hinges: pair 1's text 0.007107
    (z2), pair 2's image 0.007165 (z1+), pair 3's 0.082705 (z2+) and 0.089352 (z2); pair 1's
    image (-0.000537) and pair 2's text (-0.000479) stay off. Sum = 1.527614 / 3 = 0.509205.
    """
    images = F.normalize(torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 3.0]], dtype=F64), dim=-1)
    texts = F.normalize(torch.tensor([[0.9, 1.8], [2.8, 0.9], [1.8, 2.7]], dtype=F64), dim=-1)
    tau_one = torch.tensor(0.0, dtype=F64)
    for implementation in ("plain", "tiled"):
        clip = clip_loss(images, texts, tau_one, implementation=implementation, block_size=2)
        nt_xent = nt_xent_loss(images, texts, tau_one, implementation=implementation, block_size=2)
        assert clip.item() == pytest.approx(0.990739, abs=2e-6)
        assert nt_xent.item() == pytest.approx(1.478298, abs=2e-6)
        for reduction, expect in (("max", 0.447095), ("sum", 0.509205)):
            kwargs = {"implementation": implementation, "block_size": 2}
            hinge = hinge_loss(images, texts, tau_one, margin=0.3, reduction=reduction, **kwargs)
            assert hinge.item() == pytest.approx(expect, abs=2e-6)
    assert reference_clip_loss(images, texts, tau_one).item() == pytest.approx(0.990739, abs=2e-6)


# --- tiled == plain in float32, both close to float64 --------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, taking ||b|| as at least 0.1: with N = 1 the loss is exactly 0."""
    return ((a - b).norm() / max(b.norm().item(), 0.1)).item()


@pytest.mark.parametrize("n, block_size", [(1, 4), (5, 4), (64, 16), (100, 32), (300, 64)])
def test_tiled_clip_equals_plain_in_float32_and_both_are_near_float64(n, block_size):
    inputs32 = leaves(n, 32, seed=n, dtype=torch.float32, log_scale=math.log(50.0))
    plain, plain_grads = value_and_grads(clip_loss, inputs32[:3], implementation="plain")
    tiled, tiled_grads = value_and_grads(
        clip_loss, inputs32[:3], implementation="tiled", block_size=block_size
    )
    inputs64 = [x.detach().double().requires_grad_() for x in inputs32[:3]]
    exact, exact_grads = value_and_grads(reference_clip_loss, inputs64)
    assert rel_err(tiled, plain) <= 1e-5
    assert rel_err(tiled.double(), exact) <= 1e-5 and rel_err(plain.double(), exact) <= 1e-5
    for t, p, e in zip(tiled_grads, plain_grads, exact_grads, strict=True):
        assert rel_err(t, p) <= 1e-5
        assert rel_err(t.double(), e) <= 1e-5 and rel_err(p.double(), e) <= 1e-5


@pytest.mark.parametrize(
    "span, log_scale, dim",
    [
        (tiled._SHARED_SPAN, math.log(14.3), 64),  # CLIP's initial scale: every block shares
        (math.inf, math.log(14.3), 64),  # sharing forced
        (0.0, math.log(14.3), 64),  # sharing never passes the check
        (tiled._SHARED_SPAN, math.log(100.0), 4),  # spread-out logits: some blocks fall back
        (0.0, math.log(100.0), 4),
    ],
)
def test_both_ways_of_reducing_a_block_equal_plain(monkeypatch, span, log_scale, dim):
    """Blocks reduce row and column LSEs with one shared exp pass when their logits are close
    together, direction by direction otherwise; both must give plain's loss and gradients."""
    monkeypatch.setattr(tiled, "_SHARED_SPAN", span)
    inputs = leaves(300, dim, seed=11, dtype=torch.float32, log_scale=log_scale)[:3]
    plain, plain_grads = value_and_grads(clip_loss, inputs, implementation="plain")
    ours, grads = value_and_grads(clip_loss, inputs, implementation="tiled", block_size=64)
    exact, exact_grads = value_and_grads(
        reference_clip_loss, [x.detach().double().requires_grad_() for x in inputs]
    )
    assert rel_err(ours, plain) <= 1e-5 and rel_err(ours.double(), exact) <= 1e-5
    for t, p, e in zip(grads, plain_grads, exact_grads, strict=True):
        assert rel_err(t, p) <= 1e-5 and rel_err(t.double(), e) <= 1e-5


def test_spread_out_logits_fail_the_shared_check_and_close_ones_pass():
    close = torch.randn(64, 64) * 3
    spread = close.clone()
    spread[0] -= 60  # one row far below the block's maximum
    for x, expect in ((close, True), (spread, False)):
        shared = tiled._Shared(x)
        assert (shared.lse_both(x, torch.empty_like(x)) is not None) == expect
        assert torch.equal(x, close if expect else spread)  # x itself is left as it was


@pytest.mark.parametrize("kind", list(CASES))
def test_tiled_equals_plain_in_float32_for_every_variant(kind):
    ours_fn, _ = CASES[kind]
    n = 7  # the labels of multi_positive are for 7 samples
    inputs = leaves(n, 16, seed=3, dtype=torch.float32, log_scale=math.log(20.0))
    plain, plain_grads = value_and_grads(ours_fn, inputs, implementation="plain")
    tiled, tiled_grads = value_and_grads(ours_fn, inputs, implementation="tiled", block_size=3)
    assert rel_err(tiled, plain) <= 1e-5
    tiled_grads, plain_grads = zero_if_none(tiled_grads, inputs), zero_if_none(plain_grads, inputs)
    for t, p in zip(tiled_grads, plain_grads, strict=True):
        if p.abs().max() > 0:  # the bias of softmax losses (and hinge's scale) gets nothing
            assert rel_err(t, p) <= 1e-5


@pytest.mark.parametrize("kind", ["clip", "hinge", "hinge_sum"])
def test_tiled_keeps_no_n_by_n_tensor_for_backward(kind):
    """What autograd saves for backward: O(N*D) for tiled, the [N, N] logits for plain."""
    n, d = 256, 8
    images, texts, scale, _ = leaves(n, d, seed=4, dtype=torch.float32)
    loss_fn, _ = CASES[kind]
    for implementation, expect_square in (("tiled", False), ("plain", True)):
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(images, texts, scale, implementation=implementation, block_size=32)
        assert (max(saved) >= n * n) == expect_square, (implementation, max(saved))


# --- the temperature, the bias, and how the variants relate ---------------------------------


@pytest.mark.parametrize("kind", list(CASES))
def test_temperature_gradient_matches_finite_difference(kind):
    ours_fn, _ = CASES[kind]
    images, texts = unit(7, 4, 3), unit(7, 4, 4)
    bias = torch.tensor(-1.0, dtype=F64)
    scale = torch.tensor(1.2, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(ours_fn(images, texts, scale, bias, block_size=3), scale)
    eps = 1e-6
    up = ours_fn(images, texts, scale.detach() + eps, bias, block_size=3)
    down = ours_fn(images, texts, scale.detach() - eps, bias, block_size=3)
    assert_close(grad, (up - down) / (2 * eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", [k for k in CASES if k != "siglip"])
def test_every_loss_but_siglip_ignores_the_bias(kind):
    ours_fn, _ = CASES[kind]
    images, texts, scale, bias = leaves(7, 4, seed=5)
    with_bias = ours_fn(images, texts, scale, bias, block_size=3)
    (bias_grad,) = torch.autograd.grad(with_bias, bias)
    assert_close(with_bias, ours_fn(images, texts, scale, None, block_size=3))
    assert abs(bias_grad.item()) < 1e-12


def test_siglip_bias_gradient_is_the_mean_pair_error():
    """d/db of -sum log sigmoid(z * l) / n is sum (sigmoid(l) - [i == j]) / n."""
    images, texts, scale, bias = leaves(6, 4, seed=6)
    (grad,) = torch.autograd.grad(siglip_loss(images, texts, scale, bias, block_size=4), bias)
    logits = scale.exp() * images @ texts.T + bias
    assert_close(grad, (torch.sigmoid(logits) - torch.eye(6, dtype=F64)).sum() / 6)


def test_variants_reduce_to_clip_at_their_neutral_settings():
    images, texts, scale, _ = leaves(9, 4, seed=7)
    clip = clip_loss(images, texts, scale, block_size=4)
    assert_close(debiased_loss(images, texts, scale, tau_plus=0.0, block_size=4), clip)
    unique = torch.arange(9)
    assert_close(multi_positive_loss(images, texts, scale, labels=unique, block_size=4), clip)
    debiased = debiased_loss(images, texts, scale, tau_plus=0.1, block_size=4)
    hard = hard_negative_loss(images, texts, scale, tau_plus=0.1, beta=1e-9, block_size=4)
    assert_close(hard, debiased)


def test_hard_negatives_weigh_the_closest_negative_more():
    """Moving one negative text next to image 0 raises hard_negative more than debiased."""
    images, texts, scale, _ = leaves(8, 6, seed=8)
    images, texts = images.detach(), texts.detach()
    near = texts.clone()
    near[1] = F.normalize(images[0] + 0.05 * texts[1], dim=-1)
    rise = {
        name: (fn(images, near, scale) - fn(images, texts, scale)).item()
        for name, fn in (
            ("debiased", lambda i, t, s: debiased_loss(i, t, s, tau_plus=0.0)),
            ("hard", lambda i, t, s: hard_negative_loss(i, t, s, tau_plus=0.0, beta=2.0)),
        )
    }
    assert rise["hard"] > rise["debiased"] > 0


def test_multi_positive_counts_a_label_mates_text_as_positive():
    """Images 0 and 2 share a label, and each matches the other's text: CLIP calls that a
    mismatch, multi_positive a match."""
    texts = torch.eye(4, dtype=F64)
    images = texts[[2, 1, 0, 3]]  # image 0 points at text 2, image 2 at text 0
    labels = torch.tensor([0, 1, 0, 2])
    scale = torch.tensor(math.log(20.0), dtype=F64)
    # CLIP: anchors 0 and 2 of each direction lose ~20 (their best match is the mate's) -> ~10;
    # multi: they average their two positives' logits (20 and 0) and lose ~10 -> ~5
    multi = multi_positive_loss(images, texts, scale, labels=labels)
    clip = clip_loss(images, texts, scale)
    assert multi.item() == pytest.approx(5.0, abs=1e-3) and clip.item() == pytest.approx(
        10.0, abs=1e-3
    )


def test_caption_labels_group_identical_token_ids():
    tokens = torch.tensor([[5, 6, 0], [7, 8, 0], [5, 6, 0], [5, 6, 1]])
    labels = caption_labels(tokens)
    assert labels[0] == labels[2] and len(set(labels.tolist())) == 3


def test_identical_duplicates_give_multi_positive_the_clip_total():
    """When duplicate captions embed identically, CLIP's symmetric loss already targets the
    uniform distribution over the group's images, so SupCon's L_out has the same global value
    (and gradient); it differs when a label groups texts that embed differently."""
    images, texts, scale, _ = leaves(5, 4, seed=9)
    texts = torch.cat([texts[:4], texts[1:2]])  # sample 4's caption = sample 1's
    labels = torch.tensor([0, 1, 2, 3, 1])
    assert_close(
        multi_positive_loss(images, texts, scale, labels=labels), clip_loss(images, texts, scale)
    )


# --- the distributed contract, without processes -------------------------------------------


@pytest.mark.parametrize("implementation", ["plain", "tiled"])
@pytest.mark.parametrize("kind", list(CASES))
def test_rank_losses_and_gradients_average_to_the_global_ones(kind, implementation):
    """Rows split over 3 'ranks': mean of rank losses = global loss, and the mean of the rank
    gradients (what DDP applies after the gather's backward summed them) = global gradient."""
    ours_fn, _ = CASES[kind]
    world = 3
    inputs = leaves(6, 4, seed=10)  # 7 labels in CASES: use 6 samples with 6 of them
    fn = ours_fn
    if kind == "multi_positive":
        fn = lambda *a, **k: multi_positive_loss(*a, labels=LABELS_7[:6], **k)  # noqa: E731
    global_loss, global_grads = value_and_grads(fn, inputs, implementation=implementation)
    rank_losses, rank_grads = [], []
    for r in range(world):
        loss, grads = value_and_grads(
            fn, inputs, rows=slice(2 * r, 2 * r + 2), implementation=implementation, block_size=3
        )
        rank_losses.append(loss)
        rank_grads.append(zero_if_none(grads, inputs))
    assert_close(sum(rank_losses) / world, global_loss)
    for k, g in enumerate(zero_if_none(global_grads, inputs)):
        assert_close(sum(grads[k] for grads in rank_grads) / world, g)


def test_rank_loss_picks_each_kind_from_the_config():
    assert LossConfig().block_size == DEFAULT_BLOCK_SIZE and LossConfig().implementation == "tiled"
    images, texts, scale, bias = leaves(7, 4, seed=11)
    for kind in LOSS_KINDS:
        cfg = LossConfig(kind=kind, block_size=3, debiased_tau_plus=0.1, hard_negative_beta=0.5)
        ours_fn, _ = CASES[kind]
        got = rank_loss(cfg, images, texts, scale, bias, labels=LABELS_7)
        assert_close(got, ours_fn(images, texts, scale, bias, block_size=3))
    cfg = LossConfig(kind="hinge", hinge_reduction="sum", block_size=3)
    hinge_sum, _ = CASES["hinge_sum"]
    got = rank_loss(cfg, images, texts, scale, bias)
    assert_close(got, hinge_sum(images, texts, scale, bias, block_size=3))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("kind", "infonce", "loss.kind: must be one of clip, nt_xent"),
        ("implementation", "fast", "loss.implementation: must be one of tiled, plain"),
        ("block_size", 0, "loss.block_size: must be >= 1"),
        ("debiased_tau_plus", 1.0, "loss.debiased_tau_plus: must be in"),
        ("hard_negative_beta", 0.0, "loss.hard_negative_beta: must be in"),
        ("init_temperature", 0.001, "loss.init_temperature: must be in"),
        ("hinge_margin", -0.1, r"loss.hinge_margin: must be in \[0, 2\]"),
        ("hinge_margin", math.nan, "loss.hinge_margin: must be a finite number"),
        ("hinge_reduction", "mean", "loss.hinge_reduction: must be one of max, sum"),
    ],
)
def test_loss_config_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**{field: value})


def test_siglip_starts_from_its_own_temperature_and_bias():
    siglip, clip = LossConfig(kind="siglip"), LossConfig()
    assert siglip.init_logit_scale == pytest.approx(math.log(10)) and siglip.init_logit_bias == -10
    assert (
        clip.init_logit_scale == pytest.approx(math.log(1 / 0.07)) and clip.init_logit_bias is None
    )


def test_bad_arguments_are_value_errors():
    images, texts, scale, _ = leaves(4, 3, seed=12)
    for kwargs, message in [
        ({"implementation": "fast"}, "implementation must be tiled or plain"),
        ({"rows": slice(3, 3)}, "rows must be a non-empty contiguous slice"),
        ({"block_size": 0}, "block_size must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            clip_loss(images, texts, scale, **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(images, texts[:3], scale)
    with pytest.raises(ValueError, match="reduction must be max or sum"):
        hinge_loss(images, texts, scale, reduction="mean")
    with pytest.raises(ValueError, match="at least 2"):
        hinge_loss(images[:1], texts[:1], scale)


# --- the hinge loss: both reductions, blocks smaller than N, split over ranks ----------------


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("reduction", ["max", "sum"])
def test_hinge_rank_losses_tiled_and_plain_match_the_loop(reduction, block_size):
    """N = 9 over 3 'ranks' of 3, blocks cutting across the ranks' edges: each rank's tiled loss
    and gradients equal plain's, and the ranks' mean equals the loop reference's."""
    world, inputs = 3, leaves(9, 4, seed=13)[:3]
    ref, ref_grads = value_and_grads(
        lambda *a: loop_hinge(*a, margin=0.3, reduction=reduction), inputs
    )
    ranks = {}  # implementation -> [(loss, grads)] by rank
    for implementation in ("plain", "tiled"):
        ranks[implementation] = [
            value_and_grads(
                hinge_loss,
                inputs,
                margin=0.3,
                reduction=reduction,
                rows=slice(3 * r, 3 * r + 3),
                implementation=implementation,
                block_size=block_size,
            )
            for r in range(world)
        ]
    for (tiled_loss, tiled_grads), (plain_loss, plain_grads) in zip(*ranks.values(), strict=True):
        assert_close(tiled_loss, plain_loss)
        for t, p in zip(tiled_grads, plain_grads, strict=True):
            assert_close(t, p)
    assert_close(sum(loss for loss, _ in ranks["tiled"]) / world, ref)
    for k, g in enumerate(zero_if_none(ref_grads, inputs)):
        assert_close(sum(grads[k] for _, grads in ranks["tiled"]) / world, g)


@pytest.mark.parametrize(
    "implementation, block_size", [("plain", 1024), ("tiled", 2), ("tiled", 1)]
)
def test_hinge_max_sends_a_tie_to_the_lowest_index(implementation, block_size):
    """Pair 0 (e0, e0) meets four equally hard negatives, cosine 0 with e1, e1, e2, e2, in
    several blocks: the max's gradient goes to the first of them, sample 1, alone."""
    samples = torch.eye(3, dtype=F64)[[0, 1, 1, 2, 2]]
    images, texts = samples.clone().requires_grad_(), samples.clone().requires_grad_()
    loss = hinge_loss(
        images,
        texts,
        torch.tensor(0.0, dtype=F64),
        margin=1.5,
        rows=slice(0, 1),
        implementation=implementation,
        block_size=block_size,
    )
    assert loss.item() == pytest.approx(1.0)  # (1.5 - 1 + 0) from the image and from the text
    for grad in torch.autograd.grad(loss, (images, texts)):
        assert grad[1].abs().sum() > 0 and grad[2:].abs().sum() == 0


# --- rectangular plans: a rank's rows against K extra columns (a queue) ----------------------


@pytest.mark.parametrize("queue_grad", [False, True])
@pytest.mark.parametrize("span", [(0, 7), (1, 6)])
@pytest.mark.parametrize("queue_size", [3, 5, 11])  # N = 7, block 4: K below both, between, above
@pytest.mark.parametrize(
    "implementation, block_size", [("plain", 4), ("tiled", 4), ("tiled", 2), ("tiled", 1024)]
)
def test_rows_lse_over_extra_columns(implementation, block_size, queue_size, span, queue_grad):
    images, _, scale, _ = leaves(7, 5, seed=14)
    queue = unit(queue_size, 5, seed=15).requires_grad_(queue_grad)
    plan = tiled.BlockPlan(7, span, None, block_size, n_cols=queue_size)
    got = tiled.lse(images, queue, scale, plan, implementation)
    expect = (scale.exp() * images[slice(*span)] @ queue.T).logsumexp(1)
    assert got.cols.numel() == 0 and got.pairs.numel() == 0
    assert_close(got.rows[0], expect)
    weights = torch.linspace(0.5, 1.5, span[1] - span[0], dtype=F64)  # not a uniform gradient
    inputs = (images, scale, queue) if queue_grad else (images, scale)
    grads = torch.autograd.grad((weights * got.rows[0]).sum(), inputs)
    expect_grads = torch.autograd.grad((weights * expect).sum(), inputs)
    for g, e in zip(grads, expect_grads, strict=True):
        assert_close(g, e)


def test_extra_columns_are_for_rows_only_plans():
    with pytest.raises(ValueError, match="n_cols .* needs cols=None"):
        tiled.BlockPlan(7, (0, 7), (0, 7), 4, n_cols=5)
    with pytest.raises(ValueError, match="n_cols must be >= 0"):
        tiled.BlockPlan(7, (0, 7), None, 4, n_cols=-1)
