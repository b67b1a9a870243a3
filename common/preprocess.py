"""The only place image decoding, image transforms and tokenization are chosen."""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.transform import (
    AugmentationCfg,
    MaybeToTensor,
    PreprocessCfg,
    image_transform_v2,
)
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import Compose, GaussianBlur, RandomApply, RandomResizedCrop

from common.tokenize import BoundedTokenizer, bounded

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # ~8k x 8k; larger images are refused before decoding

Transform = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


class InvalidImageError(ValueError):
    """Bytes that are not a decodable image, or an image over the pixel limit."""


class ImageTooLargeError(InvalidImageError):
    """An image whose header announces more pixels than allowed (decoded, or after the resize)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ResizeLimit:
    """A bound on an image's pixels after the eval transform's resize to `cfg.size`.

    A shortest-side resize scales a thin image up along its long side: 1 x 100,000 pixels become
    64 x 6,400,000 for a 64-pixel model. The decoded-pixel limit cannot see that.
    """

    cfg: PreprocessCfg
    max_pixels: int


def resized_pixels(width: int, height: int, cfg: PreprocessCfg) -> int:
    """Pixels of a `width` x `height` image after the resize step of `image_transform(cfg)`.

    "shortest" keeps the aspect ratio and scales the image until it covers the target (then
    crops); "longest" and "squash" never produce more than the target's pixels.
    """
    size = cfg.size
    target_h, target_w = (size[0], size[1]) if isinstance(size, tuple | list) else (size, size)
    if cfg.resize_mode != "shortest":
        return target_h * target_w
    scale = max(target_h / max(height, 1), target_w / max(width, 1))
    return max(round(width * scale), 1) * max(round(height * scale), 1)


def check_image_size(
    width: int, height: int, *, max_pixels: int, resize: ResizeLimit | None = None
) -> None:
    """`ImageTooLargeError` if the decoded or (with `resize`) the resized image is too large."""
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if resize is not None:
        after = resized_pixels(width, height, resize.cfg)
        if after > resize.max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height}: resized for the model it would be {after} pixels; "
                f"the limit is {resize.max_pixels} (the aspect ratio is too extreme)"
            )


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels."""
    if not data:
        raise InvalidImageError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the size
            width, height = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is over PIL's pixel limit: {exc}") from None
    except Image.UnidentifiedImageError:
        raise InvalidImageError("not a decodable image: unknown or corrupt image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"not a decodable image: {exc}") from exc
    return width, height


def load_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, resize: ResizeLimit | None = None
) -> Image.Image:
    """Decode image bytes to RGB; pixel counts (and, with `resize`, the pixels after the model's
    resize) are checked from the header before decoding."""
    if not data:
        raise InvalidImageError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            check_image_size(width, height, max_pixels=max_pixels, resize=resize)
            image.load()
            # convert() copies even an RGB image: twice the memory of a large one, for nothing
            return image if image.mode == "RGB" else to_8_bit(image).convert("RGB")
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own limit, met in Image.open when max_pixels is above it: still "too large"
        raise ImageTooLargeError(f"image is over PIL's pixel limit: {exc}") from None
    except Image.UnidentifiedImageError:
        raise InvalidImageError("not a decodable image: unknown or corrupt image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"not a decodable image: {exc}") from exc


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grey image scaled to 8 bits; other images as they are.

    PIL's convert("RGB") clips such values at 255, so a 16-bit PNG came out nearly all white.
    """
    if image.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return image
    pixels = np.asarray(image, dtype=np.float32)
    top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
    return Image.fromarray(np.clip(pixels * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")


def decode_or_skip(
    data: bytes,
    skipped: Counter[str],
    *,
    key: str,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image | None:
    """`load_image`, or None with the sample counted as `image_too_large` or `corrupt_image`.

    The one rule for a stored sample's image, shared by training, evaluation and index builds.
    """
    try:
        return load_image(data, max_pixels=max_pixels)
    except InvalidImageError as exc:
        reason = "image_too_large" if isinstance(exc, ImageTooLargeError) else "corrupt_image"
        skipped[reason] += 1
        log.debug("skipped sample %s (%s): %s", key, reason, exc)
        return None


def preprocess_config(clip: Any) -> PreprocessCfg:
    """Image size, mean/std, interpolation and resize mode that the open_clip model declares."""
    return PreprocessCfg(**clip.visual.preprocess_cfg)


def preprocess_dict(cfg: PreprocessCfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@dataclasses.dataclass(frozen=True, slots=True)
class Augmentation:
    """What the training transform does to an image; ranges are (min, max), probability 0 = off.

    The defaults are the transform training always had: a random resized crop of 90-100% of the
    area and nothing else. Never a flip: the captions of the synthetic data (and of much web
    data) say "left" and "right". Every random draw comes from torch's or Python's global
    generator, which the data pipeline seeds per sample (train.data.seeded).
    """

    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    """Brightness, contrast, saturation, hue, as torchvision's ColorJitter takes them."""
    color_jitter_prob: float = 0.0
    gray_scale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1


def image_transform(
    cfg: PreprocessCfg, *, train: bool, augment: Augmentation | None = None
) -> Transform:
    """PIL image -> normalised [3, H, W] tensor; `augment` (default: `Augmentation()`) applies
    only to training: evaluation and serving resize and center-crop."""
    if not train:
        if augment is not None:
            raise ValueError("augmentation is for training only (train=False was asked for)")
        return image_transform_v2(cfg, is_train=False)
    return _train_transform(cfg, augment or Augmentation())


def _train_transform(cfg: PreprocessCfg, augment: Augmentation) -> Compose:
    """open_clip's non-timm training transform (crop, colour jitter, grey), with what that path
    lacks added to its steps: the crop's aspect-ratio range, SimCLR's blur, random erasing.

    open_clip's timm path (use_timm) has the ratio and erasing, but builds another crop (other
    random draws: not the transform training had), fixes re_mode to "pixel", has no blur, and
    ignores color_jitter_prob and gray_scale_prob.
    """
    aug_cfg = AugmentationCfg(
        scale=augment.crop_scale,
        color_jitter=augment.color_jitter if augment.color_jitter_prob else None,
        color_jitter_prob=augment.color_jitter_prob or None,
        gray_scale_prob=augment.gray_scale_prob or None,
    )
    with warnings.catch_warnings():
        # open_clip calls color_jitter, color_jitter_prob and gray_scale_prob "unused" whenever
        # they are set, though its non-timm path applies them; nothing else is passed
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        steps = list(image_transform_v2(cfg, is_train=True, aug_cfg=aug_cfg).transforms)
    # steps: [crop, convert, (jitter), (grey), to_tensor, normalize]
    crop = steps[0]
    if not isinstance(crop, RandomResizedCrop):
        raise TypeError(f"open_clip's training transform starts with {crop!r}, not a crop")
    steps[0] = RandomResizedCrop(  # the same crop, with the ratio open_clip leaves out
        crop.size,
        scale=crop.scale,
        ratio=augment.crop_ratio,
        interpolation=crop.interpolation,
        antialias=crop.antialias,
    )
    if augment.blur_prob:
        # SimCLR: after the colour ops, on the crop, a kernel 10% of the image side, odd, >= 3
        side = min(cfg.size) if isinstance(cfg.size, tuple | list) else cfg.size
        blur = GaussianBlur(2 * max(side // 20, 1) + 1, sigma=augment.blur_sigma)
        to_tensor = next(i for i, step in enumerate(steps) if isinstance(step, MaybeToTensor))
        steps.insert(to_tensor, RandomApply([blur], p=augment.blur_prob))
    if augment.re_prob:
        # after Normalize, as in timm: "pixel" and "rand" fill with N(0, 1) in normalised units
        erase = RandomErasing(
            augment.re_prob, mode=augment.re_mode, max_count=augment.re_count, device="cpu"
        )
        steps.append(erase)
    return Compose(steps)


def tokenizer(model_name_or_dir: str) -> BoundedTokenizer:
    """open_clip's tokenizer for a registered model name or a `local-dir:` artifact path, with
    the cost bounds of `common.tokenize` (training, evaluation, index builds and the service)."""
    from common.model import register_bundled_configs

    register_bundled_configs()
    return bounded(open_clip.get_tokenizer(model_name_or_dir))
