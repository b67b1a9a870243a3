"""Training augmentation: today's transform by default, each option takes effect, seeded draws."""

import dataclasses

import numpy as np
import pytest
import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from PIL import Image

from common.preprocess import Augmentation, Transform, image_transform
from train.config import AugmentConfig
from train.data import seeded

CFG = PreprocessCfg(size=32)
PLAIN = PreprocessCfg(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # x -> 2x - 1
EVERYTHING = Augmentation(
    crop_scale=(0.5, 1.0),
    color_jitter_prob=0.8,
    gray_scale_prob=0.5,
    blur_prob=0.5,
    re_prob=0.5,
    re_count=3,
)


def noise(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def ramps(side: int = 64) -> Image.Image:
    """Red rises from left to right, green from top to bottom."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.zeros((side, side, 3), dtype=np.uint8)
    pixels[..., 0] = ramp[None, :].round()
    pixels[..., 1] = ramp[:, None].round()
    return Image.fromarray(pixels, "RGB")


def apply(transform: Transform, image: Image.Image, seed: int) -> torch.Tensor:
    with seeded(seed):
        return transform(image)


def test_default_is_the_transform_training_always_had():
    ours = image_transform(CFG, train=True)
    before = image_transform_v2(CFG, is_train=True, aug_cfg=AugmentationCfg(scale=(0.9, 1.0)))
    configured = image_transform(CFG, train=True, augment=AugmentConfig().augmentation)
    assert repr(ours) == repr(configured) == repr(before)
    for seed in range(4):
        image = noise(seed)
        torch.testing.assert_close(
            apply(ours, image, seed), apply(before, image, seed), rtol=0, atol=0
        )


def test_evaluation_is_never_augmented():
    # open_clip's eval transform to the bit, whatever the random state: no random step (its last
    # two steps are computed in numpy here, so the two Compose reprs differ)
    ours = image_transform(CFG, train=False)
    reference = image_transform_v2(CFG, is_train=False)
    for seed in range(4):
        image = noise(seed)
        expected = apply(reference, image, seed)
        for draw in (seed, seed + 100):
            torch.testing.assert_close(apply(ours, image, draw), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="training only"):
        image_transform(CFG, train=False, augment=Augmentation())


def test_crop_scale_and_ratio_set_the_cropped_region():
    """A crop of half the area at aspect 2 spans the whole width and half the height."""
    image, cfg = ramps(), PreprocessCfg(size=32, mean=(0, 0, 0), std=(1, 1, 1))
    halves = image_transform(
        cfg, train=True, augment=Augmentation(crop_scale=(0.5, 0.5), crop_ratio=(2.0, 2.0))
    )
    whole = image_transform(
        cfg, train=True, augment=Augmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    )
    for seed in range(3):
        red, green = apply(halves, image, seed)[:2]
        assert red.max() - red.min() > 0.9 and 0.4 < green.max() - green.min() < 0.6
        red, green = apply(whole, image, seed)[:2]
        assert red.max() - red.min() > 0.9 and green.max() - green.min() > 0.9


def test_gray_scale_makes_the_channels_equal():
    grey = image_transform(PLAIN, train=True, augment=Augmentation(gray_scale_prob=1.0))
    out = apply(grey, noise(0), seed=1)
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[1], out[2])
    assert not torch.equal(*apply(image_transform(PLAIN, train=True), noise(0), seed=1)[:2])


def test_color_jitter_changes_colours():
    jitter = Augmentation(color_jitter=(0.8, 0.8, 0.8, 0.2), color_jitter_prob=1.0)
    plain = apply(image_transform(CFG, train=True), noise(0), seed=2)
    jittered = apply(image_transform(CFG, train=True, augment=jitter), noise(0), seed=2)
    assert (jittered - plain).abs().mean() > 0.05


def test_blur_smooths_a_high_frequency_image():
    plain = apply(image_transform(CFG, train=True), noise(0), seed=3)  # same seed: same crop
    blurred = apply(
        image_transform(CFG, train=True, augment=Augmentation(blur_prob=1.0)), noise(0), 3
    )

    def variation(x: torch.Tensor) -> torch.Tensor:
        return (x[:, 1:] - x[:, :-1]).abs().mean() + (x[:, :, 1:] - x[:, :, :-1]).abs().mean()

    assert variation(blurred) < 0.8 * variation(plain)


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
def test_random_erasing_replaces_a_box(mode):
    erase = Augmentation(re_prob=1.0, re_mode=mode)
    plain = apply(image_transform(CFG, train=True), noise(0), seed=4)
    erased = apply(image_transform(CFG, train=True, augment=erase), noise(0), seed=4)
    changed = (erased != plain).any(dim=0)  # [H, W]
    rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
    box = erased[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert changed.sum() == box[0].numel() >= 0.02 * 32 * 32  # one box, of 2-33% of the image
    if mode == "const":
        assert torch.all(box == 0)
    elif mode == "rand":
        assert torch.all(box == box[:, :1, :1])  # one colour per box


def test_augmentation_is_a_function_of_the_seed():
    """Every op draws from the generators `seeded` forks: resume replays the same images."""
    transform, image = image_transform(CFG, train=True, augment=EVERYTHING), noise(0)
    outputs = [apply(transform, image, seed) for seed in (0, 0, 1, 2, 3)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert all(not torch.equal(outputs[0], other) for other in outputs[2:])
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    apply(transform, image, 5)
    assert torch.equal(torch.rand(1), expected)  # the caller's generator is untouched


def test_config_maps_every_field():
    cfg = AugmentConfig(
        crop_scale_min=0.2,
        crop_ratio_max=2.0,
        color_jitter=(0.8, 0.8, 0.8, 0.2),
        color_jitter_prob=0.8,
        gray_scale_prob=0.2,
        blur_prob=0.5,
        blur_sigma_max=1.5,
        re_prob=0.25,
        re_mode="const",
        re_count=2,
    )
    assert dataclasses.asdict(cfg.augmentation) == {
        "crop_scale": (0.2, 1.0),
        "crop_ratio": (0.75, 2.0),
        "color_jitter": (0.8, 0.8, 0.8, 0.2),
        "color_jitter_prob": 0.8,
        "gray_scale_prob": 0.2,
        "blur_prob": 0.5,
        "blur_sigma": (0.1, 1.5),
        "re_prob": 0.25,
        "re_mode": "const",
        "re_count": 2,
    }
    assert AugmentConfig().augmentation == Augmentation()
