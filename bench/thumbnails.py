"""What thumbnails add to an index build: CPU seconds and disk bytes per 10k images.

    python bench/thumbnails.py [--images 2000] [--source-px 256 1024] [--build]

Photo-like test images (smooth gradients, a few shapes, sensor-like noise; JPEG quality 90)
are decoded once, as the index build decodes them for the model; what is timed is only what
`--thumbnails` adds per image: `make_thumbnail` (resize, EXIF check, encode) and the append to
the packed file. Figures are scaled to 10k images, one process (the build runs one per rank).
`--build` also times a whole `serve.build_index` of the same images with a tiny model, with and
without thumbnails (an upper bound on the relative overhead: a real model embeds far slower).
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serve.indexing.thumbnails import PackWriter, ThumbnailSpec, make_thumbnail  # noqa: E402

PER = 10_000


def photo(rng: np.random.Generator, side_px: int) -> bytes:
    """A 4:3 JPEG that compresses like a photo: gradient, shapes, noise."""
    width, height = side_px, side_px * 3 // 4
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-0.3, 0.3, size=(3, 2)) * 256 / side_px
    pixels = np.stack([base[c] + slope[c, 0] * x + slope[c, 1] * y for c in range(3)], axis=-1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        size = rng.uniform(0.1, 0.4) * side_px
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.ellipse((x0, y0, x0 + size, y0 + size * 0.8), fill=fill)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image


def time_thumbnails(
    images: list[Image.Image], spec: ThumbnailSpec, directory: Path
) -> tuple[float, int]:
    """Seconds and bytes to make and pack thumbnails of `images`."""
    writer = PackWriter(directory / f"{spec.format}-{spec.max_side_px}.bin")
    start = time.perf_counter()
    for image in images:
        writer.add(make_thumbnail(image, spec))
    pack = writer.close()
    return time.perf_counter() - start, pack.total_bytes


def time_builds(jpegs: list[bytes], directory: Path) -> None:
    """A whole index build of `jpegs` with duet-micro, with and without thumbnails."""
    from common.artifact import write_artifact
    from common.model import build_model
    from serve.indexing.build import build_index

    shard = directory / "photos.tar"
    with tarfile.open(shard, "w") as tar:
        for i, data in enumerate(jpegs):
            for name, member in ((f"{i:08d}.jpg", data), (f"{i:08d}.txt", b"a photo")):
                info = tarfile.TarInfo(name)
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))
    artifact = write_artifact(build_model("duet-micro"), directory / "artifact", provenance={})
    for fmt in ("none", "webp"):
        spec = ThumbnailSpec(format=fmt)
        summary = build_index(artifact, str(shard), directory / f"index-{fmt}", thumbnails=spec)
        per = summary["seconds"] * PER / len(jpegs)
        print(f"| build, duet-micro, thumbnails {fmt} | {per:.1f} s per 10k images |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--source-px", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--build", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    specs = [ThumbnailSpec(format="webp"), ThumbnailSpec(format="jpeg"),
             ThumbnailSpec(format="webp", max_side_px=128)]  # fmt: skip
    print("| source images | thumbnails | CPU s per 10k | MB per 10k | KB each |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for side_px in args.source_px:
            jpegs = [photo(rng, side_px) for _ in range(args.images)]
            images = [decoded(data) for data in jpegs]
            for spec in specs:
                seconds, total = time_thumbnails(images, spec, Path(tmp))
                scale = PER / len(images)
                print(
                    f"| {side_px}x{side_px * 3 // 4} JPEG | {spec.format} {spec.max_side_px} px "
                    f"| {seconds * scale:.1f} | {total * scale / 1e6:.1f} "
                    f"| {total / len(images) / 1e3:.1f} |"
                )
            if args.build and side_px == args.source_px[0]:
                time_builds(jpegs, Path(tmp))


if __name__ == "__main__":
    main()
