"""The only place image decoding, image transforms and tokenization are chosen."""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Callable
from typing import Any

import open_clip
import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from PIL import Image

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # ~8k x 8k; larger images are refused before decoding

Transform = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


class InvalidImageError(ValueError):
    """Bytes that are not a decodable image, or an image over the pixel limit."""


class ImageTooLargeError(InvalidImageError):
    """An image whose header announces more pixels than allowed."""


def load_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to RGB; the pixel count is checked from the header before decoding."""
    if not data:
        raise InvalidImageError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {width}x{height} = {width * height} pixels; "
                    f"the limit is {max_pixels}"
                )
            return image.convert("RGB")
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own limit, met in Image.open when max_pixels is above it: still "too large"
        raise ImageTooLargeError(f"image is over PIL's pixel limit: {exc}") from None
    except Image.UnidentifiedImageError:
        raise InvalidImageError("not a decodable image: unknown or corrupt image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"not a decodable image: {exc}") from exc


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
