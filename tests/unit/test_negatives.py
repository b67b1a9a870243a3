"""Negatives beyond the batch: the queue loss and the global contrastive loss against their
definitions, the state that carries them from step to step, and exact resume of both."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from common.config import apply_overrides
from common.model import build_model
from common.preprocess import tokenizer
from train.compute import Precision
from train.config import LossConfig, smoke
from train.data import sample_id
from train.distributed import DistInfo
from train.loss import (
    clip_loss,
    global_contrastive_loss,
    log_denominators,
    moving_log_average,
    queue_clip_loss,
)
from train.negatives import FeatureQueue, GlobalDenominators, Negatives, StepNegatives
from train.objective import Features, Inputs, StepLoss
from train.trainer import Trainer

ONE = DistInfo(0, 1, 0, torch.device("cpu"))


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def queue_oracle(images, texts, scale, queue_images, queue_texts, key_images=None, key_texts=None):
    """The definition: each anchor's cross-entropy over [its batch candidates; the queue]."""
    labels = torch.arange(images.shape[0])
    by_text = key_texts if key_texts is not None else texts
    by_image = key_images if key_images is not None else images
    image_logits = scale.exp() * images @ torch.cat([by_text, queue_texts]).T
    text_logits = scale.exp() * texts @ torch.cat([by_image, queue_images]).T
    return (F.cross_entropy(image_logits, labels) + F.cross_entropy(text_logits, labels)) / 2


@pytest.mark.parametrize("implementation", ["plain", "tiled"])
@pytest.mark.parametrize("momentum_keys", [False, True])
def test_the_queue_loss_is_cross_entropy_over_batch_and_queue(implementation, momentum_keys):
    n, k = 10, 7
    images, texts = unit(n, 8, seed=1), unit(n, 8, seed=2)
    queue_images, queue_texts = unit(k, 8, seed=3), unit(k, 8, seed=4)
    keys = {"key_images": unit(n, 8, seed=5), "key_texts": unit(n, 8, seed=6)}
    keys = keys if momentum_keys else {}
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (images, texts, scale)]
    expected = queue_oracle(*leaves, queue_images, queue_texts, **keys)
    want = torch.autograd.grad(expected, leaves)
    # two "ranks" of 5 (block 3 cuts their stripes unevenly): the rank losses average to it
    got_leaves = [x.clone().requires_grad_() for x in (images, texts, scale)]
    losses = [
        queue_clip_loss(
            *got_leaves,
            queue_images=queue_images,
            queue_texts=queue_texts,
            rows=rows,
            implementation=implementation,
            block_size=3,
            **keys,
        )
        for rows in (slice(0, 5), slice(5, 10))
    ]
    total = (losses[0] + losses[1]) / 2
    assert_close(total, expected)
    for got, wanted in zip(torch.autograd.grad(total, got_leaves), want, strict=True):
        assert_close(got, wanted)


def test_an_empty_queue_is_clip_loss():
    images, texts = unit(6, 4, seed=1), unit(6, 4, seed=2)
    scale = torch.tensor(2.0, dtype=torch.float64)
    empty = images.new_zeros(0, 4)
    got = queue_clip_loss(images, texts, scale, queue_images=empty, queue_texts=empty)
    assert_close(got, clip_loss(images, texts, scale))


def test_the_queue_keeps_the_newest_keys_and_round_trips():
    queue = FeatureQueue(5, torch.device("cpu"))
    assert queue.columns()[0].shape[0] == 0
    for start in (0, 3, 6):  # rows 0..8 in pushes of 3: the last 5 stay
        rows = torch.arange(start, start + 3, dtype=torch.float32)[:, None].expand(3, 2)
        queue.push(rows, -rows)
    images, texts = queue.columns()
    assert sorted(images[:, 0].tolist()) == [4.0, 5.0, 6.0, 7.0, 8.0]
    assert_close(texts, -images)
    copy = FeatureQueue(5, torch.device("cpu"))
    copy.load_state_dict(queue.state_dict())
    big = torch.arange(9, dtype=torch.float32)[:, None].expand(9, 2)  # more than it holds
    for q in (queue, copy):
        q.push(big[:2], big[:2])
    assert torch.equal(queue.columns()[0], copy.columns()[0])
    queue.push(big, big)
    assert sorted(queue.columns()[0][:, 0].tolist()) == [4.0, 5.0, 6.0, 7.0, 8.0]


@pytest.mark.parametrize("implementation", ["plain", "tiled"])
def test_log_denominators_are_the_mean_over_negatives(implementation):
    n = 9
    images, texts = unit(n, 6, seed=1), unit(n, 6, seed=2)
    scale = torch.tensor(math.log(7.0), dtype=torch.float64)
    cos = images @ texts.T
    off = ~torch.eye(n, dtype=torch.bool)
    for rows in (slice(0, 4), slice(4, 9)):
        log_g = log_denominators(
            images, texts, scale, rows=rows, implementation=implementation, block_size=2
        )
        for side, c in enumerate((cos, cos.T)):
            diff = 7.0 * (c - c.diagonal()[:, None])  # s * (<a_i, b_j> - <a_i, b_i>)
            g = torch.stack([diff[i][off[i]].exp().mean() for i in range(n)])
            assert_close(log_g[side], g[rows].log())


def test_the_moving_average_starts_at_the_first_estimate():
    log_u = torch.tensor([float("nan"), math.log(2.0)])
    log_g = torch.tensor([math.log(3.0), math.log(4.0)])
    got = moving_log_average(log_u, log_g, 0.25).exp()
    assert_close(got, torch.tensor([3.0, 0.75 * 2.0 + 0.25 * 4.0]))
    assert_close(moving_log_average(log_u, log_g, 1.0), log_g)


@pytest.mark.parametrize("temperature", ["learned", "fixed"])
def test_the_global_loss_has_the_estimators_gradients(temperature):
    """d/dw = tau/(eps+u) dg/dw; learned: d/dtau = log(eps+u) + tau/(eps+u) dg/dtau + rho."""
    n, rho, eps = 6, 2.0, 1e-3
    images, texts = unit(n, 5, seed=1).requires_grad_(), unit(n, 5, seed=2).requires_grad_()
    scale = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
    log_u = (torch.rand(n, dtype=torch.float64) - 1.0, torch.rand(n, dtype=torch.float64))
    log_g = log_denominators(images, texts, scale if temperature == "learned" else scale.detach())
    loss = global_contrastive_loss(log_g, log_u, scale, temperature=temperature, rho=rho, eps=eps)
    got = torch.autograd.grad(loss, [images, texts, scale], retain_graph=True)

    tau = (-scale.detach()).exp()
    weights = [tau / (eps + u.exp()) for u in log_u]  # per anchor, constants
    objective = sum(0.5 * tau * (eps + u.exp()).log().mean() for u in log_u)
    objective = objective + (rho * tau if temperature == "learned" else 0.0)
    assert_close(loss.detach(), objective)
    g = [x.exp() for x in log_g]
    weighted = sum(0.5 * (w * g_side).mean() for w, g_side in zip(weights, g, strict=True))
    want = torch.autograd.grad(weighted, [images, texts, scale], allow_unused=True)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    if temperature == "fixed":
        assert got[2].item() == 0.0
    else:  # d/dlogit_scale = d/dtau * dtau/dlogit_scale, dtau/dlogit_scale = -tau
        log_terms = sum(0.5 * (eps + u.exp()).log().mean() for u in log_u) + rho
        assert_close(got[2], want[2] + log_terms * -tau)


def test_the_key_encoder_takes_one_ema_step_toward_the_model():
    """p_k <- m p_k + (1 - m) p after an applied step, against the hand computation; a skipped
    step leaves it where it is."""
    m = 0.75  # far from 0.5, so that swapping m and 1 - m cannot pass
    torch.manual_seed(0)
    model = build_model("duet-micro")
    negatives = Negatives(LossConfig(negatives="queue", queue_momentum=m), model, ONE)
    key_before = {n: p.clone() for n, p in negatives.momentum.model.named_parameters()}
    with torch.no_grad():  # an "optimizer step": the online model moves away from the copy
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    online = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = torch.randn(4, 3, 32, 32)
    tokens = tokenizer("duet-micro")(["a red circle", "a blue square", "a star", "green"])
    fp32 = Precision("fp32", ONE.device)

    negatives.before_step(images, tokens, None, fp32, 0)
    negatives.after_step(model, applied=False)
    for name, key in negatives.momentum.model.named_parameters():
        assert torch.equal(key, key_before[name]), name

    negatives.before_step(images, tokens, None, fp32, 0)
    negatives.after_step(model, applied=True)
    keys = dict(negatives.momentum.model.named_parameters())
    assert keys.keys() == online.keys()
    for name, key in keys.items():
        assert_close(key, m * key_before[name] + (1 - m) * online[name], msg=name)
        assert not torch.equal(key, key_before[name]), name  # it moved at all
    assert negatives.queue.filled == 4  # and the step's keys joined the queue


def test_global_denominators_keep_what_they_are_given():
    table = GlobalDenominators(6, ONE)
    ids = torch.tensor([4, 1, -1, 9])  # -1 and 9: unknown ids get no estimate
    assert torch.isnan(table.lookup(ids)).all()
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    table.store(ids, values)
    found = table.lookup(ids)
    assert_close(found[:2], values[:2])
    assert torch.isnan(found[2:]).all()
    assert table.known == 2
    copy = GlobalDenominators(6, ONE)
    copy.load_state_dict(table.state_dict())
    assert_close(copy.lookup(ids[:2]), values[:2])


def test_a_non_finite_estimate_is_not_kept():
    """A step whose features blew up is skipped; its samples' estimates start over, rather than
    an infinite u silencing those samples for the rest of the run."""
    cfg = LossConfig(negatives="global", global_gamma=0.5)
    table = GlobalDenominators(4, ONE)
    step = StepNegatives(ids=torch.arange(4), denominators=table)
    images, texts = unit(4, 3, seed=1).float(), unit(4, 3, seed=2).float()
    no_inputs = Inputs(torch.zeros(4, 3, 1, 1), torch.zeros(4, 1))  # the loss reads no pixels
    images[1] = float("inf")
    StepLoss(cfg, ONE, step)(Features(images, texts, torch.tensor(2.0), None), no_inputs)
    kept = table.lookup(torch.arange(4))
    assert not torch.isinf(kept).any() and torch.isnan(kept[1]).all()  # unknown, not inf
    images[1] = unit(3, seed=3).float()
    StepLoss(cfg, ONE, step)(Features(images, texts, torch.tensor(2.0), None), no_inputs)
    assert torch.isfinite(table.lookup(torch.arange(4))).all()


def test_sample_ids_are_the_shard_offset_plus_the_place_in_the_shard():
    offsets = {"a.tar": (0, 3), "b.tar": (3, 2)}
    assert sample_id({"__url__": "b.tar", "__index__": 1}, offsets) == 4
    assert sample_id({"__url__": "b.tar", "__index__": 2}, offsets) == -1  # beyond its count
    assert sample_id({"__url__": "c.tar", "__index__": 0}, offsets) == -1
    assert sample_id({"__url__": "a.tar", "__index__": 0}, None) == -1


def test_loss_negatives_is_validated():
    with pytest.raises(ValueError, match="loss.negatives: queue works with loss.kind=clip only"):
        LossConfig(kind="siglip", negatives="queue")
    with pytest.raises(ValueError, match="loss.queue_batch_keys: momentum needs a key encoder"):
        LossConfig(negatives="queue", queue_momentum=0.0, queue_batch_keys="momentum")
    with pytest.raises(ValueError, match="loss.global_gamma"):
        LossConfig(negatives="global", global_gamma=0.0)


def run(tmp_path, synth_dir, name, steps, *extra, resume=False):
    cfg = apply_overrides(
        smoke(),
        [
            f"run_dir={tmp_path / name}",
            f"steps={steps}",
            f"data.train_shards={synth_dir}/train/shard-{{000000..000003}}.tar",
            "data.val_shards=",
            "data.batch_size_per_rank=16",
            "checkpoint.every_steps=4",
            "logging.every_steps=1",
            "logging.tensorboard=false",
            *extra,
        ],
    )
    trainer = Trainer(cfg, resume=resume)
    try:
        trainer.train()
        return trainer
    finally:
        trainer.close()


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


MODES = {
    "queue": ["loss.negatives=queue", "loss.queue_size=40", "loss.queue_momentum=0"],
    "moco": [
        "loss.negatives=queue",
        "loss.queue_size=24",
        "loss.queue_batch_keys=momentum",
        "optim.grad_cache_chunk=8",
    ],
    "global": ["loss.negatives=global", "loss.global_gamma=0.5", "optim.accum_steps=2"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_run_resumed_mid_way_takes_the_same_steps(tmp_path, synth_dir, mode):
    """The queue, the key encoder and the per-sample estimates are in the checkpoint: resumed at
    step 4, steps 5..8 have the uninterrupted run's losses."""
    reference = run(tmp_path, synth_dir, "reference", 8, *MODES[mode])
    expected = losses(tmp_path / "reference")
    state = torch.load(tmp_path / "reference/checkpoints/step-00000004.pt", weights_only=False)
    negatives = state["negatives"]
    if mode == "global":
        known = ~torch.isnan(negatives["global"]["log_u"][:, 0])
        assert int(known.sum()) == 4 * 16  # every sample seen in 4 steps has an estimate
        assert reference.negatives.denominators is not None
    else:
        assert negatives["queue"]["filled"] == min(4 * 16, int(MODES[mode][1].split("=")[1]))
        assert ("momentum" in negatives) == (mode == "moco")
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copy(tmp_path / "reference/checkpoints/step-00000004.pt", resumed_dir)
    run(tmp_path, synth_dir, "resumed", 8, *MODES[mode], resume=True)
    got = losses(tmp_path / "resumed")
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step
