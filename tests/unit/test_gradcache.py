"""GradCache gives the one-pass loss and gradient; accumulation gives per-micro-batch losses."""

import copy

import open_clip
import pytest
import torch
from torch.testing import assert_close

from common.config import apply_overrides
from common.model import DualEncoder, build_model
from common.preprocess import tokenizer
from train.compute import Precision
from train.config import LossConfig, TrainConfig
from train.distributed import DistInfo
from train.objective import Features, Inputs, StepLoss
from train.step import accumulate, forward_backward, grad_cache, one_pass

ONE = DistInfo(0, 1, 0, torch.device("cpu"))
FP32 = Precision("fp32", ONE.device)
N = 12


def batch(n: int = N, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    words = ["red", "green", "blue", "circle", "square", "star", "small", "large", "top", "left"]
    captions = [" ".join(words[(i * 3 + j) % len(words)] for j in range(3)) for i in range(n)]
    return torch.randn(n, 3, size, size, generator=g), tokenizer("duet-micro")(captions)


def model_for(cfg: LossConfig, name: str = "duet-micro") -> DualEncoder:
    torch.manual_seed(123)
    return build_model(
        name, init_logit_scale=cfg.init_logit_scale, init_logit_bias=cfg.init_logit_bias
    )


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = grads(reference)
    got = grads(model)
    assert got.keys() == expected.keys() == {n for n, _ in model.named_parameters()}
    for name, grad in expected.items():
        assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("kind", "chunk"),
    [("clip", 5), ("clip", 1), ("siglip", 4), ("nt_xent", 7), ("multi_positive", 5)],
)
def test_grad_cache_equals_one_pass(kind: str, chunk: int):
    # block_size 4: the tiled loss cuts the 12 x 12 logits unevenly; chunks 5 and 7 leave a
    # short last chunk
    cfg = LossConfig(kind=kind, block_size=4)
    images, tokens = batch()
    reference, model = model_for(cfg), model_for(cfg)
    expected = one_pass(reference, Inputs(images, tokens), StepLoss(cfg, ONE), FP32)
    loss = grad_cache(model, Inputs(images, tokens), StepLoss(cfg, ONE), FP32, chunk)
    assert_close(loss, expected)
    assert_same_grads(model, reference)  # every parameter, the temperature (and bias) included


def test_grad_cache_replays_the_random_state_of_each_chunk():
    """With patch dropout (random per forward) the re-run must draw each chunk's first masks."""
    cfg = LossConfig(kind="clip")
    torch.manual_seed(123)
    clip = open_clip.create_model("duet-micro", force_patch_dropout=0.5)
    model = DualEncoder(clip, "duet-micro", 64).train()
    reference = copy.deepcopy(model)
    images, tokens = batch()

    # the reference: the same chunks, embedded once each with graph, in the same order
    torch.manual_seed(7)
    outputs = [reference(i, t) for i, t in zip(images.split(5), tokens.split(5), strict=True)]
    image_features = torch.cat([o[0] for o in outputs])
    text_features = torch.cat([o[1] for o in outputs])
    scale = outputs[0][2]
    features = Features(image_features, text_features, scale, None)
    expected = StepLoss(cfg, ONE)(features, Inputs(images, tokens))
    expected.backward()
    after_reference = torch.rand(1)

    torch.manual_seed(7)
    loss = grad_cache(model, Inputs(images, tokens), StepLoss(cfg, ONE), FP32, 5)
    assert torch.rand(1) == after_reference  # the replays leave the global random state alone
    assert_close(loss, expected.detach())
    assert_same_grads(model, reference)

    # the test can fail: other masks give another loss
    torch.manual_seed(8)
    other = torch.cat(
        [model(i, t)[0] for i, t in zip(images.split(5), tokens.split(5), strict=True)]
    )
    assert not torch.allclose(other, image_features)


def test_grad_cache_updates_batch_norm_statistics_once():
    """duet-tiny's ResNet has batch norm: the replayed forward must not update it again."""
    cfg = LossConfig(kind="clip")
    images, tokens = batch(8, size=64)
    model, reference = model_for(cfg, "duet-tiny"), model_for(cfg, "duet-tiny")
    grad_cache(model, Inputs(images, tokens), StepLoss(cfg, ONE), FP32, 4)
    with torch.no_grad():
        for i, t in zip(images.split(4), tokens.split(4), strict=True):
            reference(i, t)  # one train-mode forward per chunk
    buffers = dict(reference.named_buffers())
    for name, value in model.named_buffers():
        assert_close(value, buffers[name], msg=name)
    assert model.clip.visual.bn1.num_batches_tracked.item() == 2


def test_accumulation_averages_micro_batch_losses_and_changes_the_loss():
    cfg = LossConfig(kind="clip")
    images, tokens = batch()
    model, reference = model_for(cfg), model_for(cfg)
    loss = accumulate(model, Inputs(images, tokens), StepLoss(cfg, ONE), FP32, micro_batches=3)
    # reference: each third of the batch is its own loss, gradients averaged
    losses = []
    for i, t in zip(images.chunk(3), tokens.chunk(3), strict=True):
        part = one_pass(reference, Inputs(i, t), StepLoss(cfg, ONE), FP32)
        losses.append(part)
    for p in reference.parameters():
        p.grad /= 3
    assert_close(loss, torch.stack(losses).mean())
    assert_same_grads(model, reference)
    # fewer negatives per anchor: not the big-batch loss (which GradCache keeps)
    full = one_pass(model_for(cfg), Inputs(images, tokens), StepLoss(cfg, ONE), FP32)
    assert abs(loss.item() - full.item()) > 0.1


def test_forward_backward_picks_the_configured_strategy():
    cfg = LossConfig(kind="clip")
    images, tokens = batch()
    plain, cached, accumulated = model_for(cfg), model_for(cfg), model_for(cfg)
    a = forward_backward(plain, Inputs(images, tokens), StepLoss(cfg, ONE), FP32)
    b = forward_backward(
        cached, Inputs(images, tokens), StepLoss(cfg, ONE), FP32, grad_cache_chunk=4
    )
    c = forward_backward(
        accumulated, Inputs(images, tokens), StepLoss(cfg, ONE), FP32, accum_steps=2
    )
    assert_close(a, b)
    assert abs(a.item() - c.item()) > 0.1


def test_bf16_autocast_keeps_the_loss_and_gradients_float32():
    cfg = LossConfig(kind="clip")
    images, tokens = batch()
    bf16 = Precision("bf16", ONE.device)
    model, reference = model_for(cfg), model_for(cfg)
    loss = grad_cache(model, Inputs(images, tokens), StepLoss(cfg, ONE), bf16, 4)
    expected = one_pass(reference, Inputs(images, tokens), StepLoss(cfg, ONE), FP32)
    assert loss.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads(model).values())
    assert_close(loss, expected, rtol=2e-2, atol=0.0)  # bf16 towers: ~3 significant digits
    assert loss.item() != expected.item()  # and the towers did run in bf16


def test_batch_split_config_errors():
    with pytest.raises(ValueError, match=r"optim.accum_steps: must divide .*batch_size_per_rank"):
        apply_overrides(TrainConfig(), ["data.batch_size_per_rank=10", "optim.accum_steps=3"])
    with pytest.raises(ValueError, match="optim.grad_cache_chunk: cannot be combined"):
        apply_overrides(TrainConfig(), ["optim.grad_cache_chunk=8", "optim.accum_steps=2"])
    with pytest.raises(ValueError, match=r"optim.grad_cache_chunk: must be <= .*\(64\)"):
        apply_overrides(TrainConfig(), ["optim.grad_cache_chunk=65"])
    cfg = apply_overrides(TrainConfig(), ["optim.grad_cache_chunk=16"])
    assert cfg.optim.grad_cache_chunk == 16 and cfg.optim.accum_steps == 1
