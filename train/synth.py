"""Generate the built-in synthetic image–text dataset as deterministic webdataset tar shards.

Each image is one coloured shape on a noisy grey background; its caption names the shape's
size, colour, shape and position in one of several wordings. The class is "COLOR SHAPE".

    python -m train.synth --out data/synth --train-shards 16 --samples-per-shard 1000 --seed 0

Layout under --out (img2dataset / webdataset conventions):
    train/shard-000000.tar ...   KEY.jpg, KEY.txt, KEY.json per sample, adjacent
    train/sizes.json             {"shard-000000.tar": M, ...}
    val/shard-000000.tar ...     held-out split, keys start at shard number 90000
    val/sizes.json
    zeroshot.json                {"classnames": [...30 (wide: 256)], "templates": [...]}
    dataset.json                 summary returned by generate()

Same arguments give byte-identical files: every shard draws from its own random stream derived
from (seed, split, shard index), so changing --train-shards leaves val and earlier shards alone.

`--kind compositional` writes the harder benchmark of train/synth_compositional.py in the same
layout instead: two or three objects in a spatial relation per image, colour–shape pairs that
never occur in train, and hard-negative captions in every val sample's JSON; `--palette wide`
draws it from 16 colours x 16 shapes (256 classes) instead of 6 x 5. Tiny models saturate
the default `--kind shapes` (zero-shot 0.98 in 400 steps), so it cannot tell methods apart.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import numbers
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw

from train import synth_compositional as scenes
from train.synth_draw import (
    BASIC,
    COLOR_JITTER,
    COLOR_RGB,
    COLORS,
    GREY_RANGE,
    PALETTES,
    SHAPES,
    SPLITS,
    Palette,
    class_index,
    classname,
    draw_shape,
    noisy_background,
)

logger = logging.getLogger(__name__)

SIZES: tuple[str, ...] = ("small", "large")
# Shape extent (bounding-box side) as a fraction of the image side: (low, high).
SIZE_FRACTIONS: dict[str, tuple[float, float]] = {"small": (0.25, 0.35), "large": (0.50, 0.65)}
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
# Nominal shape centre as (x, y) fractions in image coordinates: y grows downwards, as viewed.
# Corners sit at 0.3 rather than 0.25 so large shapes are clipped less by the border.
POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
CENTER_JITTER = 0.04  # ± fraction of the side; keeps every centre well inside its region

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} {where}",
    "{pos_dash}: {color} {shape}, {size}",
    "{a_color} {color} {shape}, {size}, {at}",
    "there is a {size} {color} {shape} {where}",
    "{size} {color} {shape} ({pos})",
    "a {size} {shape} in {color}, {at}",
    "{color} {shape} {at}, {size}",
    "the {shape} is {color} and {size}, {where}",
    # Less detailed captions, as web captions often are: they teach the model that "a red
    # circle" means every red circle, whatever its size and position.
    "{a_color} {color} {shape}",
    "{color} {shape}",
    "{a_color} {color} {shape} {where}",
    "a {size} {color} {shape}",
)
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} shape.",
    "a drawing of a {}.",
    "a {} on a noisy background.",
)
VAL_SHARD_OFFSET = 90000  # val keys use shard numbers 90000.. so they never collide with train
JPEG_QUALITY = 90
KINDS: tuple[str, ...] = ("shapes", "compositional")

# Draws one sample from a shard's random stream at a given image side: (image, JSON attributes).
SampleDrawer = Callable[[np.random.Generator, int], tuple[Image.Image, dict]]


def make_caption(template_index: int, *, shape: str, color: str, size: str, position: str) -> str:
    """Fill one caption template; every template names the colour and the shape."""
    is_center = position == "center"
    return CAPTION_TEMPLATES[template_index].format(
        size=size,
        color=color,
        shape=shape,
        pos=position,
        pos_dash=position.replace(" ", "-"),
        where="in the center" if is_center else f"in the {position} corner",
        at="in the center" if is_center else f"at the {position}",
        a_color="an" if color[0] in "aeiou" else "a",
    )


def draw_sample(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, dict]:
    """Draw one random sample: an RGB image and its attributes, caption and label."""
    # One call for all scalars: per-call Generator overhead dominates at 64 px.
    u = rng.random(12).tolist()
    shape = SHAPES[int(u[0] * len(SHAPES))]
    color = COLORS[int(u[1] * len(COLORS))]
    size = SIZES[int(u[2] * len(SIZES))]
    position = POSITIONS[int(u[3] * len(POSITIONS))]
    low, high = SIZE_FRACTIONS[size]
    half_extent = (low + (high - low) * u[4]) * image_size / 2
    fx, fy = POSITION_CENTERS[position]
    cx = (fx + CENTER_JITTER * (2 * u[5] - 1)) * image_size
    cy = (fy + CENTER_JITTER * (2 * u[6] - 1)) * image_size
    rgb = COLOR_RGB[color]
    fill = tuple(
        min(255, max(0, rgb[c] + round(COLOR_JITTER * (2 * u[7 + c] - 1)))) for c in range(3)
    )
    grey = int(GREY_RANGE[0] + (GREY_RANGE[1] - GREY_RANGE[0]) * u[10])

    image = noisy_background(rng, image_size, grey)
    draw_shape(ImageDraw.Draw(image), shape, cx, cy, half_extent, fill)
    template_index = int(u[11] * len(CAPTION_TEMPLATES))
    caption = make_caption(template_index, shape=shape, color=color, size=size, position=position)
    attributes = {
        "caption": caption,
        "shape": shape,
        "color": color,
        "size": size,
        "position": position,
        "label": class_index(color, shape),
        "classname": classname(color, shape),
    }
    return image, attributes


def _encode_jpeg(image: Image.Image) -> bytes:
    """Deterministic JPEG: fixed quality, 4:4:4 so small shapes keep their colour."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buffer.getvalue()


# name, mode, uid, gid, size, mtime, checksum, type, linkname, magic, version, uname, gname,
# devmajor, devminor (empty for regular files, as tarfile leaves them), prefix, padding.
_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12x")
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads archives to whole records; so do we


def tar_header(name: str, size: int) -> bytes:
    """USTAR header with fixed metadata (mode 0644, uid/gid 0, no owner names, mtime 0).

    Equal to tarfile.TarInfo.tobuf(USTAR_FORMAT) for these fields, built directly because
    tarfile.addfile costs ~40 us per member, a quarter of the per-sample budget.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    header = _USTAR.pack(
        encoded, b"0000644\0", b"0000000\0", b"0000000\0", b"%011o\0" % size,
        b"00000000000\0", b" " * 8, b"0", b"", b"ustar\0", b"00", b"", b"", b"", b"", b"",
    )  # fmt: skip
    return header[:148] + b"%06o\0" % sum(header) + header[155:]


def _write_member(file: BinaryIO, name: str, data: bytes) -> None:
    file.write(tar_header(name, len(data)))
    file.write(data)
    file.write(b"\0" * (-len(data) % _TAR_BLOCK))


def _write_shard(
    path: Path,
    rng: np.random.Generator,
    shard_number: int,
    n_samples: int,
    image_size: int,
    sample_digits: int,
    draw: SampleDrawer,
) -> None:
    """Write one tar shard of n_samples; written to a temp name then renamed into place."""
    tmp_path = path.with_name(path.name + ".tmp")
    with open(tmp_path, "wb") as file:
        for index in range(n_samples):
            image, attributes = draw(rng, image_size)
            key = f"{shard_number:05d}{index:0{sample_digits}d}"
            record = {"key": key, "status": "success", "width": image_size,
                      "height": image_size, **attributes}  # fmt: skip
            _write_member(file, f"{key}.jpg", _encode_jpeg(image))
            _write_member(file, f"{key}.txt", attributes["caption"].encode("utf-8"))
            _write_member(file, f"{key}.json", json.dumps(record, sort_keys=True).encode())
        file.write(b"\0" * (2 * _TAR_BLOCK))  # end-of-archive marker
        file.write(b"\0" * (-file.tell() % _TAR_RECORD))
    os.replace(tmp_path, path)


def _shard_rng(seed: int, split_id: int, shard_index: int) -> np.random.Generator:
    """Independent stream per (seed, split, shard): val never depends on the train shard count."""
    return np.random.default_rng(np.random.SeedSequence([seed, split_id, shard_index]))


def _write_split(
    split_dir: Path,
    shard_sizes: list[int],
    *,
    seed: int,
    split_id: int,
    first_shard: int,
    image_size: int,
    sample_digits: int,
    draw: SampleDrawer,
) -> dict:
    """Write one split's shards and sizes.json; returns its summary for dataset.json."""
    split_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard_index, n_samples in enumerate(shard_sizes):
        name = f"shard-{shard_index:06d}.tar"
        rng = _shard_rng(seed, split_id, shard_index)
        _write_shard(
            split_dir / name,
            rng,
            first_shard + shard_index,
            n_samples,
            image_size,
            sample_digits,
            draw,
        )
        sizes[name] = n_samples
        logger.debug("wrote %s (%d samples)", split_dir / name, n_samples)
    _write_json(split_dir / "sizes.json", sizes)
    logger.info("wrote %s: %d shards, %d samples", split_dir, len(sizes), sum(sizes.values()))
    last = len(shard_sizes) - 1
    return {
        "pattern": f"{split_dir.name}/shard-{{000000..{last:06d}}}.tar",
        "shards": len(shard_sizes),
        "samples": sum(shard_sizes),
    }


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate(
    *,
    train_shards: int,
    samples_per_shard: int,
    seed: int,
    val_samples: int,
    image_size: int,
    kind: str,
    train_negatives: bool = False,
    palette: str = BASIC.name,
) -> None:
    """Raise ValueError naming the first bad argument."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if train_negatives and kind != "compositional":
        raise ValueError("train_negatives needs --kind compositional (shapes have no negatives)")
    if palette not in PALETTES:
        raise ValueError(f"palette must be one of {', '.join(PALETTES)}, got {palette!r}")
    if palette != BASIC.name and kind != "compositional":
        raise ValueError(f"palette {palette} needs --kind compositional (shapes: basic only)")
    for name, value in (
        ("train_shards", train_shards),
        ("samples_per_shard", samples_per_shard),
        ("val_samples", val_samples),
    ):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_int(image_size) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    if train_shards > VAL_SHARD_OFFSET:
        raise ValueError(
            f"train_shards must be <= {VAL_SHARD_OFFSET} so keys stay unique, got {train_shards}"
        )
    if -(-val_samples // samples_per_shard) > 100000 - VAL_SHARD_OFFSET:
        raise ValueError(
            f"val_samples needs more than {100000 - VAL_SHARD_OFFSET} val shards "
            f"at samples_per_shard={samples_per_shard}, got {val_samples}"
        )


def _kind_parts(
    kind: str, train_negatives: bool, palette: Palette
) -> tuple[dict[str, SampleDrawer], tuple[str, ...], dict]:
    """A kind's drawer per split, its zero-shot templates, and its extra dataset.json fields."""
    if kind == "shapes":
        return {split: draw_sample for split in SPLITS}, ZEROSHOT_TEMPLATES, {}
    drawers: dict[str, SampleDrawer] = {
        split: functools.partial(
            scenes.draw_scene,
            split=split,
            negatives=split == "val" or train_negatives,
            palette=palette,
        )
        for split in SPLITS
    }
    fields = {**scenes.dataset_fields(palette), "train_negatives": train_negatives}
    return drawers, scenes.ZEROSHOT_TEMPLATES, fields


def generate(
    out_dir: Path,
    *,
    train_shards: int,
    samples_per_shard: int,
    seed: int,
    val_samples: int = 512,
    image_size: int = 64,
    kind: str = "shapes",
    train_negatives: bool = False,
    palette: str = BASIC.name,
) -> dict:
    """Write the dataset of `kind` (one of KINDS) under out_dir; returns dataset.json's content.

    train_negatives (compositional only): train samples carry hard negatives too, as val's do.
    palette (compositional only): the colours and shapes drawn (train/synth_draw.py PALETTES).
    """
    _validate(
        train_shards=train_shards,
        samples_per_shard=samples_per_shard,
        seed=seed,
        val_samples=val_samples,
        image_size=image_size,
        kind=kind,
        train_negatives=train_negatives,
        palette=palette,
    )
    colours_and_shapes = PALETTES[palette]
    drawers, zeroshot_templates, extra_fields = _kind_parts(
        kind, train_negatives, colours_and_shapes
    )
    out_dir = Path(out_dir)
    # img2dataset widens the sample part of the key when a shard holds more than 10^4 samples.
    sample_digits = max(4, len(str(samples_per_shard - 1)))
    common = {"seed": seed, "image_size": image_size, "sample_digits": sample_digits}
    full_val, rest = divmod(val_samples, samples_per_shard)
    val_sizes = [samples_per_shard] * full_val + ([rest] if rest else [])
    summary = {
        "seed": seed,
        "image_size": image_size,
        "train": _write_split(
            out_dir / "train",
            [samples_per_shard] * train_shards,
            split_id=SPLITS.index("train"),
            first_shard=0,
            draw=drawers["train"],
            **common,
        ),
        "val": _write_split(
            out_dir / "val",
            val_sizes,
            split_id=SPLITS.index("val"),
            first_shard=VAL_SHARD_OFFSET,
            draw=drawers["val"],
            **common,
        ),
        "num_classes": colours_and_shapes.num_classes,
        **extra_fields,
    }
    _write_json(
        out_dir / "zeroshot.json",
        {"classnames": colours_and_shapes.classnames(), "templates": list(zeroshot_templates)},
    )
    _write_json(out_dir / "dataset.json", summary)
    return summary


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    description = "Generate the synthetic image–text webdataset shards."
    parser = argparse.ArgumentParser(prog="python -m train.synth", description=description)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--train-shards", type=int, required=True, help="number of train shards")
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        required=True,
        help="samples per shard (val shards hold at most this many)",
    )
    parser.add_argument("--seed", type=int, required=True, help="random seed")
    parser.add_argument("--val-samples", type=int, default=512, help="held-out samples")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (>= 16)")
    parser.add_argument(
        "--kind",
        default="shapes",
        choices=KINDS,
        help="shapes: one shape per image; compositional: two or three objects in a spatial "
        "relation, held-out colour-shape pairs, hard-negative captions (default: shapes)",
    )
    parser.add_argument(
        "--train-negatives",
        action="store_true",
        help="compositional: train samples carry hard-negative captions too (loss.hard_negatives)",
    )
    parser.add_argument(
        "--palette",
        default=BASIC.name,
        choices=tuple(PALETTES),
        help="compositional: basic (6 colours x 5 shapes, 30 classes) or wide (16 x 16, 256 "
        "classes) (default: basic)",
    )
    args = parser.parse_args(argv)
    try:
        _validate(**_generate_kwargs(args))
    except ValueError as error:
        # Messages start with the Python argument name; show the flag the user typed instead.
        name, _, reason = str(error).partition(" ")
        parser.error(f"argument --{name.replace('_', '-')}: {reason}")
    return args


def _generate_kwargs(args: argparse.Namespace) -> dict:
    """The parsed flags as generate() keywords (argparse names them identically)."""
    return {name: value for name, value in vars(args).items() if name != "out"}


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point: generate the dataset and print a one-line throughput summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _parse_args(argv)
    start = time.perf_counter()
    summary = generate(args.out, **_generate_kwargs(args))
    seconds = time.perf_counter() - start
    samples = summary["train"]["samples"] + summary["val"]["samples"]
    print(
        f"wrote {samples} samples to {args.out} in {seconds:.2f} s "
        f"({samples / seconds:.0f} samples/s)"
    )
    return summary


if __name__ == "__main__":
    main()
