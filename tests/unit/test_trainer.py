"""Optimizer parameter groups and the learning-rate schedule of the trainer."""

import math

import pytest
import torch

from common.model import build_model
from train.config import OptimConfig
from train.optimizer import build_optimizer, warmup_cosine


def test_no_weight_decay_on_biases_norms_and_temperature():
    model = build_model("duet-micro")
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.2))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "clip.logit_scale" in exempt
    assert "clip.ln_final.weight" in exempt and "clip.ln_final.bias" in exempt
    assert all(
        n.endswith("bias") or "ln" in n or n.endswith("embedding") or "logit" in n for n in exempt
    )
    assert "clip.text_projection" in decayed and "clip.token_embedding.weight" in decayed
    assert len(exempt) + len(decayed) == len(names)


def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(warmup_steps=10, total_steps=110)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(110) == pytest.approx(0.0, abs=1e-12)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 110))
    assert warmup_cosine(0, 100)(0) == pytest.approx(1.0)
    assert warmup_cosine(0, 100)(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_temperature_is_clamped_to_the_maximum_scale():
    model = build_model("duet-micro")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    model.clamp_logit_scale(100.0)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    assert model.logit_scale.requires_grad
