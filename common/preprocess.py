"""The only place image decoding, image transforms and tokenization are chosen."""

from __future__ import annotations

import dataclasses
import io
import logging
import struct
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
from torchvision.transforms import (
    Compose,
    GaussianBlur,
    Normalize,
    RandomApply,
    RandomResizedCrop,
)

from common.tokenize import BoundedTokenizer, bounded

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # ~8k x 8k; larger images are refused before decoding
DEFAULT_MAX_RESIZED_PIXELS = 4_000_000  # after the model's resize; the service's default too

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
"""The formats decoded; Pillow runs no other plugin. Each is here because its header alone
bounds what decoding its first frame costs, and it is what web clients and img2dataset send:

- JPEG (and MPO, JPEG's multi-picture form from cameras, which Pillow's JPEG plugin opens: its
  first picture is a JPEG), PNG (APNG: the default image only), WebP (animated: the first frame;
  the canvas is declared up front), GIF (the first frame; Pillow grows the size to that frame's
  extent when it opens the file), BMP (raw or RLE rows within the declared size).

Out, refused as unsupported: ICO, CUR, ICNS (Pillow decodes the embedded PNG while opening, so a
16 x 16 directory entry can hide 88 M pixels), TIFF (strips and tiles are decoded into buffers
sized by tags that the image size does not bound, pages, float and 32-bit samples, a dozen
codecs; no browser sends it), PSD, JPEG 2000, and Pillow's other scientific, game and legacy
formats (FITS, DDS, TGA, PCX, SGI, PPM, ...): no client of an image search sends them.
"""
FORMAT_NAMES = "JPEG, PNG, WebP, GIF or BMP"  # ACCEPTED_FORMATS as messages name them
_OPENED_AS = {"MPO": "JPEG"}  # Pillow's name for a file -> the accepted format it is

RGB_BYTES_PER_PIXEL = 4  # Pillow keeps RGB as RGBX
CHARGED_BYTES_PER_PIXEL = 8
"""A pixel of an image is charged as one pixel up to this peak memory per pixel (decoding plus
the conversion to RGB); a format or mode that needs more is charged proportionally more pixels,
so MAX_IMAGE_PIXELS x 8 bytes bounds every decode. Measured peaks (decode + convert):"""
_MODE_BYTES_PER_PIXEL = {
    "RGB": 4,  # decoded straight into the RGB image
    "1": 5, "L": 5, "P": 5,  # 1 byte + the RGB copy
    "I;16": 7, "I;16L": 7, "I;16B": 7, "I;16N": 7,  # 2 + 1 (8-bit, in strips) + 4
    "I": 9, "F": 9,  # 4 + 1 + 4
}  # fmt: skip
_OTHER_MODE_BYTES_PER_PIXEL = 8  # RGBA, LA, PA, CMYK, YCbCr...: 4 + the RGB copy
_FORMAT_BYTES_PER_PIXEL = {"WEBP": 16}  # libwebp's two canvases + its output + Pillow's image
TO_8_BIT_STRIP_PIXELS = 1 << 20  # rows scaled at once: a few MB of temporaries, whatever the size

Transform = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


class InvalidImageError(ValueError):
    """Bytes that are not a decodable image, or an image over the pixel limit."""


class ImageTooLargeError(InvalidImageError):
    """An image whose header announces more pixels than allowed (decoded, or after the resize)."""


class ImageTooThinError(ImageTooLargeError):
    """An image within the decoded-pixel limit whose aspect ratio the model's resize would blow
    up past the resized-pixel limit (`ResizeLimit`)."""


class UnsupportedFormatError(InvalidImageError):
    """An image in a format outside ACCEPTED_FORMATS: never decoded."""


class TruncatedImageError(InvalidImageError):
    """An image whose header is sound but whose data ends before its pixels do."""


@dataclasses.dataclass(frozen=True, slots=True)
class ResizeLimit:
    """A bound on an image's pixels after the eval transform's resize to `cfg.size`.

    A shortest-side resize scales a thin image up along its long side: 1 x 100,000 pixels become
    64 x 6,400,000 for a 64-pixel model. The decoded-pixel limit cannot see that.
    """

    cfg: PreprocessCfg
    max_pixels: int = DEFAULT_MAX_RESIZED_PIXELS


@dataclasses.dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an image's header says: enough to charge its decode before running it."""

    width: int
    height: int
    format: str  # one of ACCEPTED_FORMATS
    mode: str  # Pillow's pixel mode of the decoded first frame

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def bytes_per_pixel(self) -> int:
        """Peak memory per pixel of decoding this image and converting it to RGB."""
        if self.format in _FORMAT_BYTES_PER_PIXEL:
            return _FORMAT_BYTES_PER_PIXEL[self.format]
        return _MODE_BYTES_PER_PIXEL.get(self.mode, _OTHER_MODE_BYTES_PER_PIXEL)

    @property
    def charged_pixels(self) -> int:
        """Pixels, scaled up for images needing over CHARGED_BYTES_PER_PIXEL (a WebP: twice)."""
        per_pixel = max(self.bytes_per_pixel, CHARGED_BYTES_PER_PIXEL)
        return -(-self.pixels * per_pixel // CHARGED_BYTES_PER_PIXEL)


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


def check_image(header: ImageHeader, *, max_pixels: int, resize: ResizeLimit | None = None) -> None:
    """`ImageTooLargeError` if the decoded (charged) or, with `resize`, resized image is too
    large."""
    width, height = header.width, header.height
    if header.charged_pixels > max_pixels:
        scaled = (
            ""
            if header.charged_pixels == header.pixels
            else f" ({header.format} {header.mode} is charged {header.charged_pixels} pixels: "
            f"it decodes at {header.bytes_per_pixel} bytes per pixel)"
        )
        raise ImageTooLargeError(
            f"image is {width}x{height} = {header.pixels} pixels{scaled}; the limit is {max_pixels}"
        )
    if resize is not None:
        after = resized_pixels(width, height, resize.cfg)
        if after > resize.max_pixels:
            raise ImageTooThinError(
                f"image is {width}x{height}: resized for the model it would be {after} pixels; "
                f"the limit is {resize.max_pixels} (the aspect ratio is too extreme)"
            )


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy image from the header, by an accepted format's plugin only; nothing decoded.

    Only ACCEPTED_FORMATS' plugins run: another plugin may decode while opening (ICO does).
    """
    if not data:
        raise InvalidImageError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check sizes
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is over PIL's pixel limit: {exc}") from None
    except Image.UnidentifiedImageError:
        other = _other_format(data)
        if other is None:
            raise InvalidImageError(
                f"not a decodable image: not {FORMAT_NAMES}, or corrupt"
            ) from None
        raise UnsupportedFormatError(
            f"{other} images are not accepted: send {FORMAT_NAMES}"
        ) from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise InvalidImageError(f"not a decodable image: {exc}") from exc
    if _OPENED_AS.get(image.format or "", image.format) not in ACCEPTED_FORMATS:
        raise UnsupportedFormatError(f"{image.format} images are not accepted: send {FORMAT_NAMES}")
    return image


def _other_format(data: bytes) -> str | None:
    """The format Pillow would take `data` for, outside ACCEPTED_FORMATS; None if none.

    Only the plugins' signature checks run (on the first bytes), never their `_open`.
    """
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name not in ACCEPTED_FORMATS and accept is not None and _accepts(accept, prefix):
            return name
    return None


def _accepts(accept: Any, prefix: bytes) -> bool:
    """A plugin's signature check; False where it fails on a prefix too short for it (some
    unpack a fixed number of bytes and raise struct.error on fewer)."""
    try:
        return bool(accept(prefix))
    except Exception:  # a failed check is no match: the bytes then are no image at all
        return False


def _header(image: Image.Image) -> ImageHeader:
    width, height = image.size
    return ImageHeader(width, height, _OPENED_AS.get(image.format or "", image.format), image.mode)  # type: ignore[arg-type]


def read_header(data: bytes) -> ImageHeader:
    """The image's size, format and mode from its header, without decoding its pixels."""
    return _header(_open(data))


def load_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, resize: ResizeLimit | None = None
) -> Image.Image:
    """Decode an image's first frame to RGB; its charged pixels (and, with `resize`, the pixels
    after the model's resize) are checked from the header before decoding."""
    image = _open(data)
    check_image(_header(image), max_pixels=max_pixels, resize=resize)
    try:
        image.load()  # the first frame: later frames and pages are never read
        # convert() copies even an RGB image: twice the memory of a large one, for nothing
        return image if image.mode == "RGB" else to_8_bit(image).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image is over PIL's pixel limit: {exc}") from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        # Pillow has no type of its own for it: its decoders say so in the message
        error = TruncatedImageError if "truncated" in str(exc) else InvalidImageError
        raise error(f"not a decodable image: {exc}") from exc


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grey image scaled to 8 bits; other images as they are.

    PIL's convert("RGB") clips such values at 255, so a 16-bit PNG came out nearly all white.
    The scaling runs in strips of rows, so its temporaries are a few MB, not 12 bytes per pixel
    of the whole image: the peak is the 16-bit image + its 8-bit copy.
    """
    if image.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return image
    width, height = image.size
    sixteen = image.mode.startswith("I;16")
    top = 65535.0 if sixteen or image.getextrema()[1] > 255 else 255.0  # type: ignore[operator]
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, TO_8_BIT_STRIP_PIXELS // max(width, 1))
    for y in range(0, height, rows):
        strip = np.asarray(image.crop((0, y, width, min(y + rows, height))), dtype=np.float32)
        out[y : y + rows] = np.clip(strip * (255.0 / top) + 0.5, 0, 255)
    return Image.fromarray(out, "L")


SKIP_REASONS = {
    ImageTooLargeError: "image_too_large",
    ImageTooThinError: "image_too_thin",
    UnsupportedFormatError: "unsupported_format",
    TruncatedImageError: "truncated_image",
}


def decode_or_skip(
    data: bytes,
    skipped: Counter[str],
    *,
    key: str,
    resize: ResizeLimit,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image | None:
    """`load_image` with the service's bounds, or None with the sample counted as
    `image_too_large` (decoded pixels), `image_too_thin` (pixels once resized),
    `unsupported_format`, `truncated_image` or `corrupt_image`; an image refused by its header is
    never decoded.

    The one rule for a stored sample's image, shared by training, evaluation and index builds:
    `resize` is the model's (`ResizeLimit(preprocess_config(model))`), so a thin image that its
    resize would blow up is skipped as the service refuses it.
    """
    try:
        return load_image(data, max_pixels=max_pixels, resize=resize)
    except InvalidImageError as exc:
        reason = SKIP_REASONS.get(type(exc), "corrupt_image")
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
        steps = list(image_transform_v2(cfg, is_train=False).transforms)
        # [resize, crop, convert, to_tensor, normalize]: the last two in numpy, same bits
        if isinstance(steps[-2], MaybeToTensor) and isinstance(steps[-1], Normalize):
            steps[-2:] = [NormalizedTensor(steps[-1].mean, steps[-1].std)]
        return Compose(steps)
    return _train_transform(cfg, augment or Augmentation())


class NormalizedTensor:
    """RGB image -> normalised [3, H, W] float32 tensor: torchvision's ToTensor + Normalize,
    computed in numpy to the same bits. Torch would split each of these small element-wise ops
    over its intra-op threads, and on cores shared with other work (or with the encoder running
    beside it) the threads' hand-offs cost 50-100 ms an image instead of ~1 ms (2 cores, a
    640 x 480 photo); numpy runs them on the calling thread."""

    def __init__(self, mean: Any, std: Any) -> None:
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.fallback = Compose([MaybeToTensor(), Normalize(mean, std)])

    def __call__(self, image: Any) -> torch.Tensor:
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            return self.fallback(image)  # a tensor already, or a mode numpy would read otherwise
        pixels = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), np.float32)
        pixels /= np.float32(255)  # [3, H, W] in [0, 1], as ToTensor
        pixels -= self.mean
        pixels /= self.std
        return torch.from_numpy(pixels)


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
