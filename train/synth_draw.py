"""What the synthetic datasets draw with: shapes, colours, the noisy grey background, class names.

train/synth.py (one shape per image) and train/synth_compositional.py (scenes of several) both
draw from here, so neither imports the other's drawing.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Saturated, mutually distant RGB values so each hue survives JPEG at 64 px and grey noise.
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 175, 45),
    "blue": (35, 65, 225),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 15),
}
COLOR_JITTER = 12  # ± per channel
GREY_RANGE = (70, 185)  # per-image background level
NOISE_SHIFT = 2  # per-pixel noise = random byte >> 2, i.e. 0..63 around the grey level
NOISE_AMPLITUDE = (256 >> NOISE_SHIFT) // 2  # GREY_RANGE ± this stays inside 0..255
NUM_CLASSES = len(COLORS) * len(SHAPES)
SPLITS: tuple[str, ...] = ("train", "val")  # index = the split's id in its shards' random streams


def _star_offsets() -> tuple[tuple[float, float], ...]:
    """Unit vertices of a five-pointed star, point up, inner radius 0.45 of the outer."""
    radii = [1.0 if i % 2 == 0 else 0.45 for i in range(10)]
    angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
    return tuple((r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True))


# Polygon vertices (x, y) for a shape of half-extent 1 centred at the origin; y points down.
# The triangle's centroid, not its bounding box, sits at the origin, so it looks centred.
_POLYGON_OFFSETS: dict[str, tuple[tuple[float, float], ...]] = {
    "triangle": ((0.0, -4 / 3), (-1.0, 2 / 3), (1.0, 2 / 3)),
    "star": _star_offsets(),
}
CROSS_HALF_THICKNESS = 0.35  # arm half-width relative to the half-extent


def classname(color: str, shape: str) -> str:
    """The zero-shot class name of a colour and shape, e.g. "red circle"."""
    return f"{color} {shape}"


def class_index(color: str, shape: str) -> int:
    """Class index in classnames order: color_index * len(SHAPES) + shape_index."""
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def classnames() -> list[str]:
    """All class names in class-index order."""
    return [classname(color, shape) for color in COLORS for shape in SHAPES]


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple
) -> None:
    """Draw `shape` with half-extent r (pixels) centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "cross":
        t = r * CROSS_HALF_THICKNESS
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        draw.polygon([(cx + r * x, cy + r * y) for x, y in _POLYGON_OFFSETS[shape]], fill=fill)


def noisy_background(rng: np.random.Generator, image_size: int, grey: int) -> Image.Image:
    """Uniform grey level plus independent per-pixel, per-channel noise."""
    n_bytes = image_size * image_size * 3
    # Raw bit-generator words are ~5x cheaper than Generator.integers for bulk uint8 noise.
    raw = rng.bit_generator.random_raw(math.ceil(n_bytes / 8)).view(np.uint8)[:n_bytes]
    pixels = raw.reshape(image_size, image_size, 3) >> NOISE_SHIFT
    pixels += np.uint8(grey - NOISE_AMPLITUDE)  # no overflow: GREY_RANGE leaves the margin
    return Image.fromarray(pixels)
