"""The eval transform (serving, index builds, evaluation) gives open_clip's exact pixels, with its
element-wise steps in numpy rather than in torch's intra-op threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from common.preprocess import image_transform

WRAPPING = {"aten::lift_fresh"}  # torch.from_numpy wrapping numpy's array: no work


def _photo(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return image.convert(mode)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize(
    ("width", "height", "mode"),
    [(640, 480, "RGB"), (97, 301, "RGB"), (224, 224, "RGB"), (300, 200, "L"), (120, 90, "RGBA")],
)
def test_eval_transform_equals_open_clips_bit_for_bit(
    resize_mode: str, width: int, height: int, mode: str
) -> None:
    cfg = PreprocessCfg(size=224, resize_mode=resize_mode)
    image = _photo(width, height, mode)
    ours = image_transform(cfg, train=False)(image)
    theirs = image_transform_v2(cfg, is_train=False)(image)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert ours.is_contiguous()
    assert torch.equal(ours, theirs)


def test_eval_transform_runs_no_torch_kernels() -> None:
    """Each torch kernel here would be split over the intra-op threads: on shared cores that cost
    50-100 ms an image. None may run; the whole transform is Pillow and numpy."""
    transform = image_transform(PreprocessCfg(size=224), train=False)
    image = _photo(640, 480, "RGB")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        transform(image)
    kernels = {e.name for e in profile.events() if e.name.startswith("aten::")} - WRAPPING
    assert not kernels, f"the eval transform ran torch kernels: {sorted(kernels)}"
