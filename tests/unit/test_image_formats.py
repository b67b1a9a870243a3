"""The format rule: which formats are decoded, what a header is charged, first frames only, and
16-bit images scaled in strips."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from common.preprocess import (
    ACCEPTED_FORMATS,
    CHARGED_BYTES_PER_PIXEL,
    ImageTooLargeError,
    InvalidImageError,
    UnsupportedFormatError,
    check_image,
    load_image,
    read_header,
    to_8_bit,
)
from tests.conftest import REPO_ROOT
from tests.serve_support import black_png


def saved(fmt: str, frames: int = 1, size: tuple[int, int] = (48, 32), **options: object) -> bytes:
    """`frames` frames of distinct colours (frame i: red = 40 i) in `fmt`, written by Pillow."""
    images = [Image.new("RGB", size, (40 * i, 90, 200)) for i in range(frames)]
    out = io.BytesIO()
    extra = {"save_all": True, "append_images": images[1:]} if frames > 1 else {}
    images[0].save(out, format=fmt, **extra, **options)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "MPO"])
def test_accepted_formats_decode_to_rgb(fmt: str):
    data = saved(fmt, 2 if fmt == "MPO" else 1)
    header = read_header(data)
    assert (header.width, header.height) == (48, 32)
    assert header.format == ("JPEG" if fmt == "MPO" else fmt) and header.format in ACCEPTED_FORMATS
    image = load_image(data)
    assert image.mode == "RGB" and image.size == (48, 32)


@pytest.mark.parametrize(
    "fmt", ["ICO", "ICNS", "TIFF", "PPM", "PCX", "SGI", "DDS", "QOI", "JPEG2000", "EPS"]
)
def test_other_formats_are_refused_unopened_and_named(fmt: str):
    with pytest.raises(UnsupportedFormatError, match=f"{fmt} images are not accepted"):
        read_header(saved(fmt))
    with pytest.raises(UnsupportedFormatError):
        load_image(saved(fmt))


def test_an_ico_hiding_a_large_png_is_refused_from_its_header():
    """Pillow's ICO plugin decodes the embedded PNG inside Image.open: 49 M pixels here."""
    small = io.BytesIO()
    Image.new("RGB", (16, 16)).save(small, format="ICO", sizes=[(16, 16)])
    inner = black_png(7000, 7000, color_type=2)
    entry = bytearray(small.getvalue()[6:22])
    struct.pack_into("<II", entry, 8, len(inner), 22)
    with pytest.raises(UnsupportedFormatError, match="ICO"):
        read_header(small.getvalue()[:6] + bytes(entry) + inner)


def test_garbage_is_corrupt_not_unsupported():
    with pytest.raises(InvalidImageError) as caught:
        read_header(b"\x00" * 64)
    assert type(caught.value) is InvalidImageError


@pytest.mark.parametrize("data", [b"\x00", b"\xff\xd8", b"\x89P", b"BM", b"\x00\x00\x01"])
def test_a_few_bytes_are_corrupt_whatever_they_start_like(data: bytes):
    """Prefixes too short for some plugins' signature checks (they raised struct.error: a 500)."""
    with pytest.raises(InvalidImageError):
        read_header(data)


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("MPO", {})],
    ids=["gif", "apng", "webp", "mpo"],
)
def test_only_the_first_frame_is_decoded(fmt: str, options: dict[str, object]):
    image = load_image(saved(fmt, 5, **options))
    red = np.asarray(image)[..., 0].mean()
    assert red == pytest.approx(0, abs=8)  # frame 0 has red 0; the last one 160


def test_webp_is_charged_twice_its_pixels_and_refused_over_the_limit():
    """libwebp needs 16 bytes per pixel (two canvases, its output, Pillow's image)."""
    webp, png = (
        read_header(saved("WEBP", size=(100, 100))),
        read_header(saved("PNG", size=(100, 100))),
    )
    assert webp.charged_pixels == 2 * webp.pixels and png.charged_pixels == png.pixels
    check_image(png, max_pixels=15_000)
    with pytest.raises(ImageTooLargeError, match="16 bytes per pixel"):
        check_image(webp, max_pixels=15_000)


@pytest.mark.parametrize(
    ("mode", "bytes_per_pixel"), [("RGB", 4), ("L", 5), ("RGBA", 8), ("I;16", 7)]
)
def test_charges_follow_the_mode(mode: str, bytes_per_pixel: int):
    out = io.BytesIO()
    Image.new(mode, (10, 10)).save(out, format="PNG")
    header = read_header(out.getvalue())
    assert header.mode == mode and header.bytes_per_pixel == bytes_per_pixel
    assert bytes_per_pixel <= CHARGED_BYTES_PER_PIXEL and header.charged_pixels == 100


def test_16_bit_scaling_in_strips_equals_the_whole_image_formula():
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 65536, (700, 3000), dtype=np.uint16)  # 3 strips of 1 M pixels
    image = Image.fromarray(levels)
    expected = np.clip(levels.astype(np.float32) * (255 / 65535) + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_8_bit(image)), expected)


PEAK_SCRIPT = textwrap.dedent(
    """
    import io, struct, sys
    import numpy as np
    from PIL import Image
    from common.preprocess import InvalidImageError, load_image
    from tests.serve_support import black_png

    def kib(key):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

    def ico_around(inner):
        small = io.BytesIO()
        Image.new("RGB", (16, 16)).save(small, format="ICO", sizes=[(16, 16)])
        entry = bytearray(small.getvalue()[6:22])
        struct.pack_into("<II", entry, 8, len(inner), 22)
        return small.getvalue()[:6] + bytes(entry) + inner

    if sys.argv[1] == "ico":
        data = ico_around(black_png(7000, 7000, color_type=2))
    else:
        out = io.BytesIO()
        Image.fromarray(np.full((3000, 3000), 40000, np.uint16)).save(out, format="PNG")
        data = out.getvalue()
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    before = kib("VmRSS")
    try:
        image = load_image(data)
    except InvalidImageError:
        pass
    print((kib("VmHWM") - before) * 1024)
    """
)


def peak_growth_bytes(case: str) -> int:
    """Peak RSS growth of `load_image` on the script's `case`, measured in a fresh process."""
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, case],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(run.stdout)


def test_a_16_bit_png_decodes_within_the_charged_bytes_per_pixel():
    """A 9 M-pixel 16-bit grey PNG peaks under CHARGED_BYTES_PER_PIXEL (scaling the whole image
    through float32 took ~16)."""
    assert peak_growth_bytes("16-bit") / 9e6 < CHARGED_BYTES_PER_PIXEL


def test_an_ico_bomb_is_refused_without_its_png_being_decoded():
    """Pillow's ICO plugin would decode the 49 M-pixel PNG (~200 MB) while opening the file."""
    assert peak_growth_bytes("ico") < 20 * 2**20
