"""Hard-negative captions (loss.hard_negatives): the loss is cross-entropy over the batch's
captions plus every real negative, whichever way it is computed; the generator's negatives
differ from their captions in the one way each kind says."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg
from torch.testing import assert_close

from common.model import TEXT_LENGTH_BUCKETS, build_model, text_pooling
from common.preprocess import ResizeLimit, image_transform, tokenizer
from common.shards import iter_shards
from train import synth
from train.compute import Precision
from train.config import DataConfig, HardNegativesConfig, LossConfig
from train.data import TrainBatches
from train.distributed import DistInfo
from train.hard_negatives import (
    generate,
    normalised,
    replace_relation,
    sample_negatives,
    shard_negatives,
    swap_attribute,
    swap_object,
)
from train.loss import (
    clip_loss,
    log_denominators,
    queue_clip_loss,
    reference_clip_loss,
)
from train.negatives import GlobalDenominators, StepNegatives
from train.objective import Features, Inputs, StepLoss
from train.step import grad_cache, one_pass

ONE = DistInfo(0, 1, 0, torch.device("cpu"))
FP32 = Precision("fp32", ONE.device)


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("implementation", ["tiled", "plain"])
def test_clip_loss_with_extra_columns_is_cross_entropy_over_the_concatenated_columns(
    implementation: str,
):
    # 10 samples, 7 negatives, blocks of 3: every stripe and the extra columns cut unevenly
    images, texts, extra = leaves(unit(10, 8, seed=1), unit(10, 8, seed=2), unit(7, 8, seed=3))
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    expected = reference_clip_loss(images, texts, scale, extra)
    expected_grads = torch.autograd.grad(expected, [images, texts, extra, scale])
    # two ranks' shares average to the loss (each owns 5 rows, sees every column)
    loss = sum(
        clip_loss(
            images,
            texts,
            scale,
            rows=rows,
            implementation=implementation,
            block_size=3,
            extra_texts=extra,
        )
        for rows in (slice(0, 5), slice(5, 10))
    )
    loss = loss / 2
    assert_close(loss, expected)
    assert_close(torch.autograd.grad(loss, [images, texts, extra, scale]), expected_grads)
    # and the negatives matter: without them the loss is lower
    assert clip_loss(images, texts, scale).item() < expected.item() - 1e-3


def test_the_queue_loss_adds_the_negatives_to_the_image_anchors_only():
    images, texts, extra = leaves(unit(6, 8, seed=1), unit(6, 8, seed=2), unit(4, 8, seed=3))
    queue_images, queue_texts = unit(5, 8, seed=4), unit(5, 8, seed=5)
    scale = torch.tensor(2.0, dtype=torch.float64)
    loss = queue_clip_loss(
        images, texts, scale, queue_images=queue_images, queue_texts=queue_texts,
        block_size=4, extra_texts=extra,
    )  # fmt: skip
    s, labels = scale.exp(), torch.arange(6)
    by_image = s * images @ torch.cat([texts, queue_texts, extra]).T
    by_text = s * texts @ torch.cat([images, queue_images]).T
    expected = (F.cross_entropy(by_image, labels) + F.cross_entropy(by_text, labels)) / 2
    assert_close(loss, expected)
    grads = torch.autograd.grad(loss, [images, texts, extra])
    assert_close(grads, torch.autograd.grad(expected, [images, texts, extra]))


def test_global_denominators_count_the_negatives_among_the_image_anchors_negatives():
    images, texts, extra = leaves(unit(6, 8, seed=1), unit(6, 8, seed=2), unit(4, 8, seed=3))
    scale = torch.tensor(1.5, dtype=torch.float64)
    log_g = log_denominators(images, texts, scale, block_size=4, extra_texts=extra)
    s = scale.exp()
    logits = s * images @ torch.cat([texts, extra]).T  # [6, 10]
    positive = logits.diagonal()
    negatives = logits.masked_fill(F.pad(torch.eye(6, dtype=torch.bool), (0, 4)), -torch.inf)
    expected = negatives.logsumexp(1) - positive - torch.log(torch.tensor(6 - 1 + 4.0))
    assert_close(log_g[0], expected)
    assert_close(
        torch.autograd.grad(log_g[0].sum(), extra), torch.autograd.grad(expected.sum(), extra)
    )
    assert_close(log_g[1], log_denominators(images, texts, scale)[1])  # text side unchanged


def features_with_negatives(n: int = 6, k: int = 3) -> tuple[Features, Inputs]:
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0], [0, 0, 0]])
    features = Features(
        *leaves(unit(n, 8, seed=1).float(), unit(n, 8, seed=2).float()),
        torch.tensor(2.0, requires_grad=True),
        None,
        unit(n, k, 8, seed=3).float().requires_grad_(),
    )
    tokens = torch.zeros(n, 4, dtype=torch.long)
    inputs = Inputs(torch.zeros(n, 3, 1, 1), tokens, torch.zeros(n, k, 4, dtype=torch.long),
                    mask.bool())  # fmt: skip
    return features, inputs


@pytest.mark.parametrize("negatives", ["batch", "queue"])
def test_the_step_loss_takes_the_real_negatives_and_gives_padding_no_gradient(negatives: str):
    features, inputs = features_with_negatives()
    cfg = LossConfig(hard_negatives=True, negatives=negatives, block_size=4)
    step = None
    if negatives == "queue":  # an empty queue: the same loss as batch
        empty = torch.empty(0, 8)
        step = StepNegatives(queue_images=empty, queue_texts=empty, key_images=torch.empty(0))
    loss = StepLoss(cfg, ONE, step)(features, inputs)
    assert inputs.negative_mask is not None and features.negatives is not None
    real = features.negatives[inputs.negative_mask]  # [6, 8]: the mask's ones, in row order
    expected = reference_clip_loss(features.images, features.texts, features.logit_scale, real)
    assert_close(loss, expected)
    grad = torch.autograd.grad(loss, features.negatives)[0]
    assert (grad[~inputs.negative_mask] == 0).all()
    assert (grad[inputs.negative_mask].abs().sum(-1) > 0).all()


def test_the_global_loss_sees_the_negatives():
    features, inputs = features_with_negatives()
    cfg = LossConfig(hard_negatives=True, negatives="global", global_gamma=1.0)
    losses = []
    for mask in (inputs.negative_mask, torch.zeros_like(inputs.negative_mask)):
        step = StepNegatives(ids=torch.arange(6), denominators=GlobalDenominators(6, ONE))
        changed = Inputs(inputs.images, inputs.tokens, inputs.negative_tokens, mask)
        losses.append(StepLoss(cfg, ONE, step)(features, changed))
    assert losses[0].item() != pytest.approx(losses[1].item())


def micro_batch(n: int = 6, k: int = 2):
    g = torch.Generator().manual_seed(0)
    captions = [f"a red circle left of a blue square number {i}" for i in range(n)]
    negatives = [[f"a blue circle left of a red square {i}", "a square"] for i in range(n)]
    tokenize = tokenizer("duet-micro")
    negative_tokens = tokenize([c for row in negatives for c in row]).unflatten(0, (n, k))
    mask = torch.ones(n, k, dtype=torch.bool)
    mask[1] = False  # a sample without negatives
    mask[4, 1] = False
    return Inputs(torch.randn(n, 3, 32, 32, generator=g), tokenize(captions), negative_tokens, mask)


@pytest.fixture(scope="module")
def one_pass_reference():
    cfg = LossConfig(hard_negatives=True, block_size=4)
    inputs = micro_batch()
    torch.manual_seed(123)
    model = build_model("duet-micro")
    # the reference: plain cross-entropy over [captions; real negatives], by autograd
    images, texts, scale, _ = model(inputs.images, inputs.tokens)
    assert inputs.negative_tokens is not None and inputs.negative_mask is not None
    real = model.encode_text(inputs.negative_tokens[inputs.negative_mask])
    expected = reference_clip_loss(images, texts, scale, real)
    expected.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return cfg, inputs, expected.detach(), grads


@pytest.mark.parametrize("strategy", ["one_pass", "grad_cache"])
def test_one_pass_and_grad_cache_give_the_reference_gradient(one_pass_reference, strategy: str):
    cfg, inputs, expected, expected_grads = one_pass_reference
    torch.manual_seed(123)
    model = build_model("duet-micro")
    if strategy == "one_pass":
        loss = one_pass(model, inputs, StepLoss(cfg, ONE), FP32)
    else:  # chunks of 4 of the 6 samples, each with its negatives
        loss = grad_cache(model, inputs, StepLoss(cfg, ONE), FP32, 4)
    assert_close(loss, expected)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)  # sums of ~100 terms


def test_hard_negatives_need_the_clip_loss():
    with pytest.raises(ValueError, match="loss.hard_negatives: works with loss.kind=clip only"):
        LossConfig(kind="siglip", hard_negatives=True)


# The generator


def test_each_kind_changes_the_caption_in_its_one_way():
    rng = random.Random(0)
    caption = "a large red circle left of a small blue square"
    assert swap_attribute(caption, rng) == "a large blue circle left of a small red square"
    assert swap_object(caption, rng) == "a large red square left of a small blue circle"
    assert replace_relation(caption, rng) == "a large red circle right of a small blue square"
    assert replace_relation("A cup on top of the table.", rng) == "A cup under the table."
    assert replace_relation("The cat is Behind a box", rng) == "The cat is In front of a box"
    assert replace_relation("a dog on a sofa", rng) == "a dog under a sofa"
    # sizes where there is one colour; nouns of one number only
    assert swap_attribute("a small red ball and a large red cube", rng) == (
        "a large red ball and a small red cube"
    )
    assert swap_object("two dogs and a cat", rng) is None  # plural with singular: not fluent
    assert swap_object("two dogs and three cats", rng) == "two cats and three dogs"


def test_a_caption_without_the_words_gets_no_negative_of_that_kind():
    rng = random.Random(0)
    assert generate("a photo of something nice", ["swap_attribute", "swap_object",
                                                  "replace_relation"], rng) == {}  # fmt: skip
    assert swap_attribute("a red ball and a red cube", rng) is None  # equal colours
    assert swap_object("a dog and a dog", rng) is None


def test_every_generated_negative_differs_from_its_caption():
    rng = random.Random(1)
    words = ["red", "Red", "blue", "dog", "dogs", "cat", "on", "left", "of", "above", "a", "the",
             "two", "three", "cats", ",", "in", "front", "behind"]  # fmt: skip
    made = 0
    for _ in range(400):
        caption = " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
        for kind, negative in generate(caption, ["swap_attribute", "swap_object",
                                                 "replace_relation"], rng).items():  # fmt: skip
            assert normalised(negative) != normalised(caption), (kind, caption)
            made += 1
    assert made > 300


def test_shard_negatives_read_a_list_or_a_mapping_and_skip_the_rest():
    assert shard_negatives({"hard_negatives": ["a", 3, "b"]}, scan=10) == ["a", "b"]
    assert shard_negatives({"hard_negatives": {"x": "a", "y": None}}, scan=10) == ["a"]
    assert shard_negatives({"hard_negatives": "a caption"}, scan=10) == []
    assert shard_negatives({}, scan=10) == []
    assert shard_negatives({"hard_negatives": ["c"] * 10**6}, scan=4) == ["c"] * 4


# Where negatives come from: the shard, the generator; in batches that resume exactly


@pytest.fixture(scope="module")
def compositional_with_negatives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compositional")
    synth.generate(out / "with", train_shards=1, samples_per_shard=48, seed=3, val_samples=8,
                   kind="compositional", train_negatives=True)  # fmt: skip
    synth.generate(out / "without", train_shards=1, samples_per_shard=48, seed=3, val_samples=8,
                   kind="compositional")  # fmt: skip
    return out


def shard_records(path: Path) -> list[dict]:
    return [sample.meta for sample in iter_shards(str(path), Counter())]


def test_compositional_train_negatives_are_optional_and_change_nothing_else(
    compositional_with_negatives: Path,
):
    with_negatives = shard_records(compositional_with_negatives / "with/train/shard-000000.tar")
    without = shard_records(compositional_with_negatives / "without/train/shard-000000.tar")
    assert all("hard_negatives" not in meta for meta in without)
    assert all(meta["hard_negatives"] for meta in with_negatives)
    for meta, plain in zip(with_negatives, without, strict=True):
        negatives = meta.pop("hard_negatives")
        assert meta == plain  # same scene, caption and layout
        assert meta["caption"] not in negatives.values()


def batches_of(
    path: Path,
    generate: str = "off",
    state: dict | None = None,
    model: str = "duet-micro",
    text_pooling: tuple[str, int | None] | None = None,
) -> TrainBatches:
    cfg = DataConfig(train_shards=str(path), batch_size_per_rank=8, workers=0, shuffle_buffer=16)
    cfg.hard_negatives = HardNegativesConfig(generate=generate, max_per_sample=2)
    transform, resize = (
        image_transform(PreprocessCfg(size=32), train=True),
        ResizeLimit(PreprocessCfg(size=32)),
    )
    return TrainBatches(cfg, transform, tokenizer(model), resize, seed=0, rank=0, world_size=1,
                        state=state, hard_negatives=cfg.hard_negatives,
                        text_pooling=text_pooling)  # fmt: skip


def test_batches_carry_the_shards_negatives_padded_and_resume_exactly(
    compositional_with_negatives: Path,
):
    shard = compositional_with_negatives / "with/train/shard-000000.tar"
    negatives_of = {
        meta["caption"]: set(meta["hard_negatives"].values()) for meta in shard_records(shard)
    }
    batches = batches_of(shard)
    stream = iter(batches)
    first = next(stream)
    state = batches.state_dict()
    second = next(stream)
    assert first.negative_tokens is not None and first.negative_mask is not None
    assert first.negative_tokens.shape[:2] == first.negative_mask.shape == (8, 2)
    assert first.negative_mask.all()  # every compositional sample has 2 or 3: 2 kept
    tokenize = tokenizer("duet-micro")
    by_tokens = {tuple(tokenize([c])[0].tolist()): c for c in negatives_of}
    for caption_tokens, row in zip(first.tokens, first.negative_tokens, strict=True):
        caption = by_tokens[tuple(caption_tokens.tolist())]
        allowed = {tuple(t.tolist()) for t in tokenize(sorted(negatives_of[caption]))}
        assert {tuple(t.tolist()) for t in row} <= allowed
    resumed = next(iter(batches_of(shard, state=state)))
    assert torch.equal(resumed.negative_tokens, second.negative_tokens)
    assert torch.equal(resumed.negative_mask, second.negative_mask)


def test_batches_come_cut_to_the_length_their_captions_and_negatives_need(
    compositional_with_negatives: Path,
):
    """With the text tower's pooling, a batch's captions and negatives share the first bucketed
    length holding every row's end of text: only padding is dropped (ViT-B-32: 77 positions)."""
    shard = compositional_with_negatives / "with/train/shard-000000.tar"
    whole = next(iter(batches_of(shard, model="ViT-B-32")))
    cut = next(iter(batches_of(shard, model="ViT-B-32", text_pooling=("argmax", None))))
    assert whole.negative_tokens is not None and cut.negative_tokens is not None
    needed = max(int(t.argmax(dim=-1).max()) + 1 for t in (whole.tokens, whole.negative_tokens))
    length = cut.tokens.shape[1]
    assert cut.negative_tokens.shape == (8, 2, length)
    assert length in TEXT_LENGTH_BUCKETS and needed <= length < needed + 8
    assert torch.equal(cut.tokens, whole.tokens[:, :length])
    assert torch.equal(cut.negative_tokens, whole.negative_tokens[..., :length])
    assert not whole.tokens[:, length:].any() and not whole.negative_tokens[..., length:].any()


def test_samples_without_negatives_get_generated_ones_or_padding(
    compositional_with_negatives: Path,
):
    shard = compositional_with_negatives / "without/train/shard-000000.tar"
    padded = next(iter(batches_of(shard)))
    assert padded.negative_mask is not None and not padded.negative_mask.any()
    generated = next(iter(batches_of(shard, generate="missing")))
    assert generated.negative_mask is not None and generated.negative_mask.all()
    assert not torch.equal(generated.negative_tokens[:, 0], generated.tokens)


def test_sample_negatives_bound_the_count_and_the_length():
    cfg = HardNegativesConfig(max_per_sample=2, max_chars=20)
    meta = {"hard_negatives": ["a red cube", "a blue cube", "x" * 21, "a green cube", "the truth"]}
    picked = sample_negatives("the truth", meta, cfg, seed=0)
    assert len(picked) == 2 and set(picked) <= {"a red cube", "a blue cube", "a green cube"}
    always = HardNegativesConfig(generate="always", max_chars=60)
    caption = "a red ball left of a blue box"
    assert sample_negatives(caption, meta, always, seed=0) == [
        n for n in generate(caption, always.kinds, random.Random(0)).values()
    ]
    assert sample_negatives("a red ball left of " + "a blue box " * 9, {}, always, seed=0) == []


@pytest.mark.slow
def test_a_training_run_counts_the_negatives_it_used(
    compositional_with_negatives: Path, tmp_path: Path
):
    """Two steps of the trainer on shards whose samples carry negatives, generated where not."""
    from common.config import apply_overrides
    from train.config import smoke
    from train.trainer import Trainer

    data = compositional_with_negatives
    cfg = apply_overrides(smoke(), [
        f"run_dir={tmp_path}", "steps=2", "data.val_shards=", "data.batch_size_per_rank=8",
        f"data.train_shards={data}/with/train/shard-000000.tar",
        "logging.every_steps=1", "logging.tensorboard=false", "loss.hard_negatives=true",
        "data.hard_negatives.max_per_sample=4", "optim.grad_cache_chunk=4",
    ])  # fmt: skip
    trainer = Trainer(cfg)
    # its batches come cut to their texts' length (open_clip's CLIP text tower: argmax pooling)
    assert trainer.batches.text_pooling is not None
    assert trainer.batches.text_pooling == text_pooling(trainer.model.clip)
    try:
        trainer.train()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    used = [r["train/hard_negatives_per_sample"] for r in records if "train/loss" in r]
    # 2 or 3 per compositional sample, padded to 4
    assert len(used) == 2 and all(2 <= u <= 3 for u in used), used
    assert all(r["train/hard_negatives"] == 8 * r["train/hard_negatives_per_sample"]
               for r in records if "train/loss" in r)  # fmt: skip
