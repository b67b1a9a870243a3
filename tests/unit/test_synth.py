"""Tests for train.synth: determinism, shard layout, sample consistency and argument checks."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import synth

TRAIN_SHARDS = 2
SAMPLES_PER_SHARD = 40
VAL_SAMPLES = 100  # more than one shard: 40 + 40 + 20
IMAGE_SIZE = 64
PALETTE = np.array([synth.COLOR_RGB[c] for c in synth.COLORS], dtype=float)  # [6, 3]


def _generate(out_dir: Path, **overrides: int) -> dict:
    kwargs = {
        "train_shards": TRAIN_SHARDS,
        "samples_per_shard": SAMPLES_PER_SHARD,
        "seed": 0,
        "val_samples": VAL_SAMPLES,
        "image_size": IMAGE_SIZE,
    }
    return synth.generate(out_dir, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("synth")
    _generate(out_dir)
    return out_dir


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _read_samples(tar_path: Path) -> list[dict]:
    """Samples of one shard, asserting members come as adjacent KEY.jpg, KEY.txt, KEY.json."""
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert len(members) % 3 == 0
    samples = []
    for start in range(0, len(members), 3):
        (jpg_name, jpg), (txt_name, txt), (json_name, meta) = members[start : start + 3]
        key = jpg_name.removesuffix(".jpg")
        assert (jpg_name, txt_name, json_name) == (f"{key}.jpg", f"{key}.txt", f"{key}.json")
        samples.append({"key": key, "jpg": jpg, "txt": txt.decode(), "json": json.loads(meta)})
    return samples


def _all_samples(dataset: Path, split: str) -> list[dict]:
    return [s for tar in sorted((dataset / split).glob("*.tar")) for s in _read_samples(tar)]


def _nearest_color(rgb: np.ndarray) -> str:
    return synth.COLORS[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    summary = _generate(tmp_path / "a")
    _generate(tmp_path / "b")
    first, second = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert json.loads(first["dataset.json"]) == summary
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_different_seed_changes_every_shard(tmp_path: Path) -> None:
    _generate(tmp_path / "a", seed=0)
    _generate(tmp_path / "b", seed=1)
    first, second = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    shards = [name for name in first if name.endswith(".tar")]
    assert shards and all(first[name] != second[name] for name in shards)


def test_val_and_first_train_shards_do_not_depend_on_train_shard_count(tmp_path: Path) -> None:
    _generate(tmp_path / "one", train_shards=1)
    _generate(tmp_path / "two", train_shards=2)
    one, two = _file_bytes(tmp_path / "one"), _file_bytes(tmp_path / "two")
    for name in one:
        if name.startswith("val/") or name == "train/shard-000000.tar":
            assert one[name] == two[name], name


def test_layout_counts_and_summary(dataset: Path) -> None:
    train = sorted(p.name for p in (dataset / "train").iterdir())
    val = sorted(p.name for p in (dataset / "val").iterdir())
    assert train == ["shard-000000.tar", "shard-000001.tar", "sizes.json"]
    assert val == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "sizes.json"]
    summary = json.loads((dataset / "dataset.json").read_text())
    assert summary == {
        "seed": 0,
        "image_size": IMAGE_SIZE,
        "train": {"pattern": "train/shard-{000000..000001}.tar", "shards": 2, "samples": 80},
        "val": {"pattern": "val/shard-{000000..000002}.tar", "shards": 3, "samples": 100},
        "num_classes": 30,
    }


@pytest.mark.parametrize("split", ["train", "val"])
def test_sizes_json_matches_tar_contents(dataset: Path, split: str) -> None:
    sizes = json.loads((dataset / split / "sizes.json").read_text())
    counted = {p.name: len(_read_samples(p)) for p in sorted((dataset / split).glob("*.tar"))}
    assert sizes == counted
    assert max(sizes.values()) <= SAMPLES_PER_SHARD


def test_keys_follow_img2dataset_layout_and_splits_do_not_collide(dataset: Path) -> None:
    for split, first_shard in (("train", 0), ("val", synth.VAL_SHARD_OFFSET)):
        for shard_index, tar in enumerate(sorted((dataset / split).glob("*.tar"))):
            keys = [s["key"] for s in _read_samples(tar)]
            assert keys == [f"{first_shard + shard_index:05d}{i:04d}" for i in range(len(keys))]
    train_keys = {s["key"] for s in _all_samples(dataset, "train")}
    val_keys = {s["key"] for s in _all_samples(dataset, "val")}
    assert train_keys.isdisjoint(val_keys)


def test_metadata_agrees_with_caption_and_class(dataset: Path) -> None:
    classnames = json.loads((dataset / "zeroshot.json").read_text())["classnames"]
    for sample in _all_samples(dataset, "train") + _all_samples(dataset, "val"):
        meta = sample["json"]
        assert meta["key"] == sample["key"] and meta["status"] == "success"
        assert meta["caption"] == sample["txt"] and not sample["txt"].endswith("\n")
        assert meta["color"] in sample["txt"] and meta["shape"] in sample["txt"]
        assert meta["size"] in synth.SIZES and meta["position"] in synth.POSITIONS
        assert meta["label"] == synth.COLORS.index(meta["color"]) * 5 + synth.SHAPES.index(
            meta["shape"]
        )
        assert meta["classname"] == f"{meta['color']} {meta['shape']}"
        assert classnames[meta["label"]] == meta["classname"]
        assert (meta["width"], meta["height"]) == (IMAGE_SIZE, IMAGE_SIZE)


def test_zeroshot_file(dataset: Path) -> None:
    zeroshot = json.loads((dataset / "zeroshot.json").read_text())
    assert len(zeroshot["classnames"]) == 30 == len(set(zeroshot["classnames"]))
    assert zeroshot["classnames"][0] == "red circle"
    assert zeroshot["classnames"][5 * 2 + 3] == "blue star"
    assert len(zeroshot["templates"]) >= 4
    assert all(t.count("{}") == 1 for t in zeroshot["templates"])


def test_images_are_rgb_of_image_size(dataset: Path) -> None:
    for sample in _all_samples(dataset, "val"):
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG"
        assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_large_shape_colour_sits_at_named_position_after_jpeg(dataset: Path) -> None:
    checked = 0
    for sample in _all_samples(dataset, "train") + _all_samples(dataset, "val"):
        meta = sample["json"]
        if meta["size"] != "large":
            continue
        pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])), dtype=float)
        fx, fy = synth.POSITION_CENTERS[meta["position"]]
        x, y = round(fx * IMAGE_SIZE), round(fy * IMAGE_SIZE)
        # A 5x5 median at the nominal centre stays inside every large shape despite jitter.
        patch = np.median(pixels[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3), axis=0)
        assert patch.max() - patch.min() > 60, (meta, patch)  # saturated, not background grey
        assert _nearest_color(patch) == meta["color"], (meta, patch)
        checked += 1
    assert checked > 20


def _colour_centroid(image: Image.Image, color: str) -> tuple[float, float]:
    """Centroid (x, y) in image-side fractions of the saturated pixels nearest `color`."""
    pixels = np.asarray(image, dtype=float)  # [H, W, 3]
    distances = ((pixels[:, :, None, :] - PALETTE) ** 2).sum(axis=-1)  # [H, W, 6]
    saturated = pixels.max(axis=-1) - pixels.min(axis=-1) > 90  # grey noise spans at most 63
    mask = saturated & (distances.argmin(axis=-1) == synth.COLORS.index(color))
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0, color
    return xs.mean() / image.width, ys.mean() / image.height


def test_every_shape_is_where_its_position_says_as_a_viewer_sees_it() -> None:
    rng = np.random.default_rng(123)
    for _ in range(300):
        image, meta = synth.draw_sample(rng, IMAGE_SIZE)
        x, y = _colour_centroid(image, meta["color"])
        position = meta["position"]
        if position == "center":
            assert abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1, (meta, x, y)
            continue
        vertical, horizontal = position.split()
        assert (y < 0.45) if vertical == "top" else (y > 0.55), (meta, x, y)
        assert (x < 0.45) if horizontal == "left" else (x > 0.55), (meta, x, y)


def test_attributes_cover_all_values() -> None:
    rng = np.random.default_rng(7)
    metas = [synth.draw_sample(rng, 16)[1] for _ in range(600)]
    for field, values in (
        ("shape", synth.SHAPES),
        ("color", synth.COLORS),
        ("size", synth.SIZES),
        ("position", synth.POSITIONS),
    ):
        assert {m[field] for m in metas} == set(values), field
    assert len({m["caption"].replace(m["color"], "C") for m in metas}) > 6  # varied wording


def test_every_caption_template_names_colour_and_shape() -> None:
    assert len(synth.CAPTION_TEMPLATES) >= 6
    for index in range(len(synth.CAPTION_TEMPLATES)):
        for color in synth.COLORS:
            for shape in synth.SHAPES:
                caption = synth.make_caption(
                    index, shape=shape, color=color, size="small", position="top left"
                )
                assert color in caption and shape in caption, caption
    assert "an orange" in synth.make_caption(
        2, shape="star", color="orange", size="large", position="center"
    )


def test_tar_header_matches_tarfile() -> None:
    for name, size in (("000000000.jpg", 3935), ("x" * 100, 0), ("a.json", 8**11 - 1)):
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = 0
        expected = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        assert synth.tar_header(name, size) == expected


def test_shards_are_byte_identical_to_tarfile_output(dataset: Path) -> None:
    shard = dataset / "val" / "shard-000002.tar"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in _read_samples(shard):
            key = sample["key"]
            meta = json.dumps(sample["json"], sort_keys=True).encode()
            for name, data in ((".jpg", sample["jpg"]), (".txt", sample["txt"].encode())):
                _add(tar, key + name, data)
            _add(tar, key + ".json", meta)
    assert buffer.getvalue() == shard.read_bytes()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"train_shards": 0}, "train_shards"),
        ({"samples_per_shard": -1}, "samples_per_shard"),
        ({"val_samples": 0}, "val_samples"),
        ({"image_size": 15}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"train_shards": 2.5}, "train_shards"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(
    tmp_path: Path, overrides: dict, argument: str
) -> None:
    with pytest.raises(ValueError, match=argument):
        _generate(tmp_path, **overrides)
    assert not any(tmp_path.iterdir())  # nothing written before validation


def test_cli_writes_dataset_and_reports_throughput(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path), "--train-shards", "1", "--samples-per-shard", "5"]
    summary = synth.main([*argv, "--seed", "3", "--val-samples", "7", "--image-size", "32"])
    assert summary["train"]["samples"] == 5 and summary["val"]["samples"] == 7
    assert "12 samples" in capsys.readouterr().out
    assert json.loads((tmp_path / "dataset.json").read_text()) == summary


def test_cli_rejects_bad_argument_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path), "--train-shards", "0", "--samples-per-shard", "5"]
    with pytest.raises(SystemExit) as exit_info:
        synth.main([*argv, "--seed", "0"])
    assert exit_info.value.code == 2
    assert "--train-shards" in capsys.readouterr().err


def test_unknown_kind_raises_value_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind must be one of shapes, compositional"):
        synth.generate(tmp_path, train_shards=1, samples_per_shard=5, seed=0, kind="scenes")
    assert not any(tmp_path.iterdir())


def test_cli_kind_selects_the_compositional_scenes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path), "--train-shards", "1", "--samples-per-shard", "4"]
    summary = synth.main([*argv, "--seed", "0", "--val-samples", "3", "--kind", "compositional"])
    assert summary["kind"] == "compositional" and summary["val"]["samples"] == 3
    sample = _read_samples(tmp_path / "val" / "shard-000000.tar")[0]
    assert {"objects", "relation", "held_out", "hard_negatives"} <= sample["json"].keys()
    with pytest.raises(SystemExit) as exit_info:
        synth.main([*argv, "--seed", "0", "--kind", "scenes"])
    assert exit_info.value.code == 2
    assert "--kind" in capsys.readouterr().err
