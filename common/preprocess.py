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
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from PIL import Image

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


def image_transform(cfg: PreprocessCfg, *, train: bool) -> Transform:
    """PIL image -> normalised [3, H, W] tensor.

    Training uses open_clip's random resized crop with a mild scale range and no flips: the
    captions of the synthetic data (and of much web data) say "left" and "right".
    """
    aug = AugmentationCfg(scale=(0.9, 1.0)) if train else None
    return image_transform_v2(cfg, is_train=train, aug_cfg=aug)


def tokenizer(model_name_or_dir: str) -> Tokenizer:
    """open_clip's tokenizer for a registered model name or a `local-dir:` artifact path."""
    from common.model import register_bundled_configs

    register_bundled_configs()
    return open_clip.get_tokenizer(model_name_or_dir)
