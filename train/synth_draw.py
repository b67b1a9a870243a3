"""What the synthetic datasets draw with: shapes, colours, the noisy grey background, class names.

train/synth.py (one shape per image) and train/synth_compositional.py (scenes of several) both
draw from here, so neither imports the other's drawing.

Palettes: `BASIC` (6 colours x 5 shapes, 30 classes) is what every set draws by default;
`WIDE` (16 x 16, 256 classes) is for the compositional set when a batch must not hold many
scenes of one class (bench/small_batch.py's redesign). Its extra colours are kept at least ~70
apart on some channel from every other, and from the grey background by saturation or by
lightness (white, black, navy); its extra shapes differ in outline at the large objects' ~26 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
WIDE_COLOR_RGB: dict[str, tuple[int, int, int]] = {
    **COLOR_RGB,
    "cyan": (20, 210, 220),
    "pink": (250, 130, 190),
    "brown": (120, 60, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "lime": (150, 235, 30),
    "navy": (20, 20, 110),
    "magenta": (230, 20, 200),
    "teal": (0, 128, 128),
    "olive": (128, 128, 0),
}
WIDE_SHAPES: tuple[str, ...] = (
    *SHAPES,
    "diamond",
    "tee",
    "pentagon",
    "arrow",
    "hourglass",
    "ring",
    "frame",
    "bar",
    "pillar",
    "dome",
    "saltire",
)
SPLITS: tuple[str, ...] = ("train", "val")  # index = the split's id in its shards' random streams


def _star_offsets() -> tuple[tuple[float, float], ...]:
    """Unit vertices of a five-pointed star, point up, inner radius 0.45 of the outer."""
    radii = [1.0 if i % 2 == 0 else 0.45 for i in range(10)]
    angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
    return tuple((r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True))


# Polygon vertices (x, y) for a shape of half-extent 1 centred at the origin; y points down.
# The triangle's centroid, not its bounding box, sits at the origin, so it looks centred.
def _regular_offsets(sides: int) -> tuple[tuple[float, float], ...]:
    """Unit vertices of a regular polygon, a vertex pointing up."""
    angles = [-math.pi / 2 + 2 * math.pi * i / sides for i in range(sides)]
    return tuple((math.cos(a), math.sin(a)) for a in angles)


_POLYGON_OFFSETS: dict[str, tuple[tuple[float, float], ...]] = {
    "triangle": ((0.0, -4 / 3), (-1.0, 2 / 3), (1.0, 2 / 3)),
    "star": _star_offsets(),
    "diamond": ((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)),
    "tee": (
        (-1.0, -1.0),
        (1.0, -1.0),
        (1.0, -0.4),
        (0.3, -0.4),
        (0.3, 1.0),
        (-0.3, 1.0),
        (-0.3, -0.4),
        (-1.0, -0.4),
    ),
    "pentagon": _regular_offsets(5),
    "arrow": (
        (-1.0, -0.3),
        (0.1, -0.3),
        (0.1, -0.8),
        (1.0, 0.0),
        (0.1, 0.8),
        (0.1, 0.3),
        (-1.0, 0.3),
    ),  # fmt: skip
    "hourglass": ((-1.0, -1.0), (1.0, -1.0), (0.15, 0.0), (1.0, 1.0), (-1.0, 1.0), (-0.15, 0.0)),
    "dome": tuple((math.cos(a), 0.5 - math.sin(a)) for a in np.linspace(0, math.pi, 13)),
}
CROSS_HALF_THICKNESS = 0.35  # arm half-width relative to the half-extent
OUTLINE_THICKNESS = 0.35  # a ring's and a frame's line width relative to the half-extent


@dataclass(frozen=True, slots=True)
class Palette:
    """The colours and shapes a set draws from; its classes are every colour-shape pair, in
    colour-major order."""

    name: str
    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    rgb: dict[str, tuple[int, int, int]]

    @property
    def num_classes(self) -> int:
        return len(self.colors) * len(self.shapes)

    def class_index(self, color: str, shape: str) -> int:
        """color_index * len(shapes) + shape_index."""
        return self.colors.index(color) * len(self.shapes) + self.shapes.index(shape)

    def classnames(self) -> list[str]:
        """All class names in class-index order."""
        return [classname(color, shape) for color in self.colors for shape in self.shapes]

    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((color, shape) for color in self.colors for shape in self.shapes)

    def held_out_pairs(self) -> tuple[tuple[str, str], ...]:
        """One shape per colour, every shape at least once where there are as many colours:
        shape (step * i + 1) mod n for colour i, `step` the first from 2 coprime with n."""
        n = len(self.shapes)
        step = next(k for k in range(2, n + 2) if math.gcd(k, n) == 1)
        return tuple((c, self.shapes[(step * i + 1) % n]) for i, c in enumerate(self.colors))


BASIC = Palette("basic", COLORS, SHAPES, COLOR_RGB)
WIDE = Palette("wide", tuple(WIDE_COLOR_RGB), WIDE_SHAPES, WIDE_COLOR_RGB)
PALETTES: dict[str, Palette] = {palette.name: palette for palette in (BASIC, WIDE)}


def classname(color: str, shape: str) -> str:
    """The zero-shot class name of a colour and shape, e.g. "red circle"."""
    return f"{color} {shape}"


def class_index(color: str, shape: str) -> int:
    """Class index of the basic palette: color_index * len(SHAPES) + shape_index."""
    return BASIC.class_index(color, shape)


def classnames() -> list[str]:
    """The basic palette's class names in class-index order."""
    return BASIC.classnames()


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
    elif shape == "saltire":  # a cross turned 45 degrees: two thick diagonals
        width = max(1, round(2 * r * CROSS_HALF_THICKNESS))
        a = 0.75 * r  # the lines' width reaches past their ends: kept within the half-extent
        draw.line((cx - a, cy - a, cx + a, cy + a), fill=fill, width=width)
        draw.line((cx - a, cy + a, cx + a, cy - a), fill=fill, width=width)
    elif shape in ("ring", "frame"):  # outlines: the background shows inside
        width = max(1, round(r * OUTLINE_THICKNESS))
        box = (cx - r, cy - r, cx + r, cy + r)
        outline = draw.ellipse if shape == "ring" else draw.rectangle
        outline(box, outline=fill, width=width)
    elif shape in ("bar", "pillar"):  # a square stretched along one axis
        half_w, half_h = (r, r * 0.4) if shape == "bar" else (r * 0.4, r)
        draw.rectangle((cx - half_w, cy - half_h, cx + half_w, cy + half_h), fill=fill)
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
