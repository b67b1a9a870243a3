"""One rule for a stored sample: 16-bit images scaled, repeated keys counted, the same skip reasons
in training, evaluation and index builds."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.artifact import write_artifact
from common.model import build_model
from common.preprocess import (
    PreprocessCfg,
    ResizeLimit,
    decode_or_skip,
    image_transform,
    load_image,
    preprocess_config,
)
from common.preprocess import tokenizer as make_tokenizer
from common.shards import read_shard
from serve.indexing.build import build_index
from serve.indexing.index import SearchIndex
from tests.serve_support import black_png
from train.data import decode_samples
from train.evaluate import embed_shards
from train.sampling import Reader


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """A tar of (member name, bytes) in order; a name may repeat, as a tar allows."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("level_16", [0, 16448, 32896, 65535])  # 0, 64, 128, 255 in 8 bits
def test_16_bit_pngs_are_scaled_not_clipped(level_16: int):
    grey = Image.fromarray(np.full((8, 8), level_16, dtype=np.uint16))  # PIL: mode I;16
    decoded = load_image(png(grey))
    assert decoded.mode == "RGB"
    assert np.asarray(decoded).mean() == pytest.approx(level_16 / 257, abs=1)


def test_a_repeated_key_in_one_shard_is_counted_and_dropped(tmp_path: Path):
    red = png(Image.new("RGB", (8, 8), (200, 0, 0)))
    # tarfile keeps both members of one name: a shard written twice under one key
    members = [("a.png", red), ("a.txt", b"first"), ("b.png", red), ("b.txt", b"b")]
    path = write_tar(tmp_path / "dup.tar", [*members, ("a.png", red), ("a.txt", b"again")])
    skipped: Counter[str] = Counter()
    samples = list(read_shard(str(path), skipped))
    assert [s["__key__"] for s in samples] == ["a", "b"]
    assert samples[0]["txt"] == b"first" and skipped == {"duplicate_key": 1}


def test_evaluation_counts_too_large_images_as_the_others_do(tmp_path: Path):
    huge = png(Image.new("L", (9000, 9000)))  # 81M pixels: over the default 64M limit
    good = png(Image.new("RGB", (40, 40), (0, 0, 200)))
    shard = write_tar(
        tmp_path / "val.tar",
        [("0.png", huge), ("0.txt", b"huge"), ("1.png", good), ("1.txt", b"blue")]
        + [("2.png", b"junk"), ("2.txt", b"junk")],
    )
    skipped: Counter[str] = Counter()
    resize = ResizeLimit(PreprocessCfg(size=32))
    assert decode_or_skip(huge, skipped, key="0", resize=resize) is None
    assert skipped == {"image_too_large": 1}
    model = build_model("duet-micro").eval()
    transform = image_transform(preprocess_config(model.clip), train=False)
    held_out = embed_shards(model, transform, make_tokenizer("duet-micro"), str(shard))
    assert held_out.skipped == {"image_too_large": 1, "corrupt_image": 1}
    assert len(held_out.labels) == 1


def test_a_thin_png_is_skipped_by_evaluation_training_and_index_builds(tmp_path: Path):
    """A 4.9 KB 40,000,000 x 1 PNG is 40 M pixels (under the decoded-pixel limit) but 32 x 1.28 G
    once resized for the model: evaluation crashed on it and training ran out of memory. The
    service's resize bound skips it everywhere, counted, never decoded."""
    thin = black_png(40_000_000, 1)
    good = png(Image.new("RGB", (40, 40), (0, 0, 200)))
    shard = str(
        write_tar(
            tmp_path / "thin.tar",
            [("0.png", thin), ("0.txt", b"thin"), ("1.png", good), ("1.txt", b"blue")],
        )
    )
    model = build_model("duet-micro").eval()
    cfg = preprocess_config(model.clip)
    transform = image_transform(cfg, train=False)
    held_out = embed_shards(model, transform, make_tokenizer("duet-micro"), shard)
    assert held_out.skipped == {"image_too_thin": 1} and len(held_out.labels) == 1

    skipped: Counter[str] = Counter()
    reader = Reader(0, 0, 0, 1, 0, 1)
    train_transform = image_transform(cfg, train=True)
    samples = enumerate(read_shard(shard, skipped))
    limit = ResizeLimit(cfg)
    decoded = list(decode_samples(samples, skipped, train_transform, limit, 10**8, reader))
    assert skipped == {"image_too_thin": 1} and [sample[1] for sample in decoded] == ["blue"]

    artifact = write_artifact(model, tmp_path / "artifact", provenance={})
    build_index(artifact, shard, tmp_path / "index")
    assert SearchIndex.load(tmp_path / "index").manifest["skipped"] == {"image_too_thin": 1}
