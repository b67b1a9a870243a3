"""Tests for the compositional kind of train.synth: determinism, held-out pairs, scene geometry,
and hard negatives checked against a plain reading of each sample's JSON."""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from common.preprocess import tokenizer
from train import synth, synth_draw
from train import synth_compositional as scenes

PALETTE = np.array([synth.COLOR_RGB[c] for c in synth.COLORS], dtype=float)  # [6, 3]
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _generate(out_dir: Path, **overrides: int | str) -> dict:
    kwargs = {"train_shards": 2, "samples_per_shard": 150, "seed": 0, "val_samples": 300}
    return synth.generate(out_dir, kind="compositional", **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("compositional")
    _generate(out_dir)
    return out_dir


def _metas(dataset: Path, split: str) -> list[dict]:
    metas = []
    for path in sorted((dataset / split).glob("*.tar")):
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".json")]
            metas.extend(json.loads(tar.extractfile(m).read()) for m in members)
    return metas


def _cell(obj: dict) -> tuple[int, int]:
    vertical, horizontal = obj["cell"].split()
    return ("top", "bottom").index(vertical), ("left", "right").index(horizontal)


def _words(obj: dict) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def _reference_holds(subject: dict, relation: str, reference: dict, objects: list[dict]) -> bool:
    """A plain reading of a claim: some object fits `subject`, another `reference`, and the first
    lies on the `relation` side of the second in any row or column (diagonals count)."""
    fields = ("size", "color", "shape")
    for a, b in itertools.permutations(objects, 2):
        if all(a[f] == subject[f] for f in fields) and all(b[f] == reference[f] for f in fields):
            (r1, c1), (r2, c2) = _cell(a), _cell(b)
            side = {"left of": c1 < c2, "right of": c1 > c2, "above": r1 < r2, "below": r1 > r2}
            if side[relation]:
                return True
    return False


def test_same_arguments_give_identical_bytes_and_kind_is_recorded(tmp_path: Path) -> None:
    summary = _generate(tmp_path / "a", train_shards=1, samples_per_shard=40, val_samples=50)
    _generate(tmp_path / "b", train_shards=1, samples_per_shard=40, val_samples=50)
    files = [sorted(p for p in (tmp_path / run).rglob("*") if p.is_file()) for run in "ab"]
    assert [p.relative_to(tmp_path / "a") for p in files[0]] == [
        p.relative_to(tmp_path / "b") for p in files[1]
    ]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*files, strict=True))
    assert summary["kind"] == "compositional" and summary["num_classes"] == 30
    assert summary["held_out_classes"] == [f"{c} {s}" for c, s in scenes.HELD_OUT_PAIRS]
    shapes_dir = tmp_path / "shapes"
    synth.generate(shapes_dir, train_shards=1, samples_per_shard=40, seed=0, val_samples=50)
    assert (shapes_dir / "val" / "shard-000000.tar").read_bytes() != (
        tmp_path / "a" / "val" / "shard-000000.tar"
    ).read_bytes()


def test_scenes_agree_with_their_json(dataset: Path) -> None:
    classnames = json.loads((dataset / "zeroshot.json").read_text())["classnames"]
    metas = _metas(dataset, "train") + _metas(dataset, "val")
    for meta in metas:
        objects, caption = meta["objects"], meta["caption"]
        assert len(objects) in (2, 3) and len({o["cell"] for o in objects}) == len(objects)
        large = [o for o in objects if o["size"] == "large"]
        assert len(large) == 1 and large[0] in objects[:2]  # the anchor is one of the related pair
        assert 0 <= meta["label"] < len(classnames) == 30
        assert (
            classnames[meta["label"]]
            == meta["classname"]
            == f"{large[0]['color']} {large[0]['shape']}"
        )
        assert all(_words(o) in caption for o in objects) and meta["relation"] in caption
        # the related pair shares a row (column) and sits on the named side: true when read strictly
        (r0, c0), (r1, c1) = _cell(objects[0]), _cell(objects[1])
        strict = {"left of": (r0 == r1 and c0 < c1), "right of": (r0 == r1 and c0 > c1),
                  "above": (c0 == c1 and r0 < r1), "below": (c0 == c1 and r0 > r1)}  # fmt: skip
        assert strict[meta["relation"]], meta
    assert Counter(len(m["objects"]) for m in metas).keys() == {2, 3}
    assert {m["relation"] for m in metas} == set(scenes.RELATIONS)
    assert len({m["caption"].split()[0] for m in metas}) >= 3  # several wordings


def test_held_out_pairs_never_occur_in_train_and_val_has_both(dataset: Path) -> None:
    held_out = set(scenes.HELD_OUT_PAIRS)
    assert len(held_out) == len(synth.COLORS)
    assert {c for c, _ in held_out} == set(synth.COLORS)  # each colour is seen with other shapes
    assert {s for _, s in held_out} == set(synth.SHAPES)
    for meta in _metas(dataset, "train"):
        assert not meta["held_out"] and "hard_negatives" not in meta
        assert all((o["color"], o["shape"]) not in held_out for o in meta["objects"]), meta
    val = _metas(dataset, "val")
    for meta in val:
        pairs = {(o["color"], o["shape"]) for o in meta["objects"]}
        assert meta["held_out"] == bool(pairs & held_out), meta
    fraction = sum(m["held_out"] for m in val) / len(val)
    assert 0.35 < fraction < 0.65


def _differing_words(caption: str, negative: str) -> list[tuple[str, str]]:
    a, b = re.findall(r"[a-z]+", caption), re.findall(r"[a-z]+", negative)
    assert len(a) == len(b)
    return [(x, y) for x, y in zip(a, b, strict=True) if x != y]


def test_hard_negatives_are_one_change_away_and_false_for_the_image(dataset: Path) -> None:
    kinds: Counter[str] = Counter()
    for meta in _metas(dataset, "val"):
        caption, objects, relation = meta["caption"], meta["objects"], meta["relation"]
        subject, reference = objects[0], objects[1]
        negatives = meta["hard_negatives"]
        assert set(negatives) <= set(scenes.HARD_NEGATIVE_KINDS)
        kinds.update(list(negatives))  # the kinds, not the captions
        assert "replace_relation" in negatives  # the opposite side is always false
        expected = {}
        for field in ("color", "size"):
            if subject[field] != reference[field]:
                expected["swap_attribute"] = field
                break
        if subject["shape"] != reference["shape"]:
            expected["swap_object"] = "shape"
        for kind, field in expected.items():
            swapped = (
                {**subject, field: reference[field]},
                relation,
                {**reference, field: subject[field]},
            )
            if _reference_holds(*swapped, objects):
                assert kind not in negatives, (meta, kind)  # would be true: left out
                continue
            negative = negatives[kind]
            assert sorted(_differing_words(caption, negative)) == sorted(
                [(subject[field], reference[field]), (reference[field], subject[field])]
            ), (caption, negative)
        assert set(negatives) - {"replace_relation"} <= set(expected)
        flipped = caption.replace(relation, OPPOSITE[relation])
        assert caption.count(relation) == 1 and negatives["replace_relation"] == flipped
        assert not _reference_holds(subject, OPPOSITE[relation], reference, objects)
        assert all(n != caption for n in negatives.values())
    assert kinds["swap_attribute"] > 0.9 * kinds["replace_relation"]
    assert kinds["swap_object"] > 0.6 * kinds["replace_relation"]


def test_captions_and_negatives_fit_the_bundled_context_untruncated() -> None:
    """The longest wordings with the longest words: truncation would make negatives equal."""
    tokenize = tokenizer("duet-micro")
    long_words = scenes.Noun("small", "purple", "triangle")
    for template, third_template in itertools.product(
        range(len(scenes.CAPTION_TEMPLATES)), range(len(scenes.THIRD_OBJECT_TEMPLATES))
    ):
        for color, shape in scenes.ALL_PAIRS:
            claim = scenes.Claim(scenes.Noun("large", color, shape), "right of", long_words)
            text = scenes.render_caption(claim, long_words, template, third_template)
            tokens = tokenize([text], context_length=77)[0]
            assert int((tokens != 0).sum()) <= 20, text


def _colour_mask(pixels: np.ndarray, color: str) -> np.ndarray:
    distances = ((pixels[:, :, None, :] - PALETTE) ** 2).sum(axis=-1)  # [H, W, 6]
    saturated = pixels.max(axis=-1) - pixels.min(axis=-1) > 90  # grey noise spans at most 63
    return saturated & (distances.argmin(axis=-1) == synth.COLORS.index(color))


def test_objects_are_drawn_in_their_cells_at_their_sizes() -> None:
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(150):
        image, meta = scenes.draw_scene(rng, 64, split="val")
        pixels = np.asarray(image, dtype=float)
        colors = Counter(o["color"] for o in meta["objects"])
        extents = {}
        for obj in meta["objects"]:
            if colors[obj["color"]] > 1:
                continue  # two objects of one colour: their pixels cannot be told apart
            ys, xs = np.nonzero(_colour_mask(pixels, obj["color"]))
            row, col = _cell(obj)
            assert (xs.mean() < 32) == (col == 0) and (ys.mean() < 32) == (row == 0), meta
            extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            extents[obj["size"]] = min(extents.get(obj["size"], extent), extent)
            checked += 1
        if len(extents) == 2:  # sizes are extents, as a viewer judges them (a star's area is small)
            assert extents["large"] > 1.5 * extents["small"], (meta, extents)
    assert checked > 250


def test_images_are_rgb_jpegs_of_image_size(tmp_path: Path) -> None:
    _generate(tmp_path, train_shards=1, samples_per_shard=5, val_samples=5, image_size=48)
    with tarfile.open(tmp_path / "val" / "shard-000000.tar") as tar:
        jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    for data in jpgs:
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (48, 48)


def test_zeroshot_file_asks_for_the_large_object() -> None:
    assert all(t.count("{}") == 1 and "large {}" in t for t in scenes.ZEROSHOT_TEMPLATES)


def test_draw_scene_rejects_an_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        scenes.draw_scene(np.random.default_rng(0), 64, split="test")


def test_claims_read_relations_leniently() -> None:
    large = scenes.Noun("large", "red", "circle")
    small = scenes.Noun("small", "blue", "square")
    objects = [scenes.SceneObject(large, (0, 0)), scenes.SceneObject(small, (1, 1))]  # diagonal
    assert scenes.claim_holds(scenes.Claim(large, "left of", small), objects)
    assert scenes.claim_holds(scenes.Claim(large, "above", small), objects)
    assert not scenes.claim_holds(scenes.Claim(large, "right of", small), objects)
    assert not scenes.claim_holds(scenes.Claim(small, "left of", large), objects)


def test_wide_palette_has_256_classes_and_holds_out_every_shape_once() -> None:
    wide = synth_draw.WIDE
    assert wide.num_classes == 256 == len(set(wide.classnames()))
    assert wide.classnames()[wide.class_index("navy", "hourglass")] == "navy hourglass"
    held_out = wide.held_out_pairs()
    assert [c for c, _ in held_out] == list(wide.colors)  # one per colour
    assert sorted(s for _, s in held_out) == sorted(wide.shapes)  # each shape exactly once
    # the basic palette keeps the pairs its sets were generated with
    assert synth_draw.BASIC.held_out_pairs() == scenes.HELD_OUT_PAIRS
    assert [(c, synth.SHAPES.index(s)) for c, s in scenes.HELD_OUT_PAIRS][:3] == [
        ("red", 1),
        ("green", 3),
        ("blue", 0),
    ]


def _silhouette(shape: str, half_extent: float = 13) -> np.ndarray:
    image = Image.new("L", (64, 64))
    synth_draw.draw_shape(ImageDraw.Draw(image), shape, 32, 32, half_extent, 255)
    return np.asarray(image) > 0


def test_every_wide_shape_draws_its_own_silhouette_at_the_anchor_size() -> None:
    masks = {shape: _silhouette(shape) for shape in synth_draw.WIDE.shapes}
    for shape, mask in masks.items():
        ys, xs = np.nonzero(mask)
        assert mask.sum() > 60, shape  # something the size of an anchor
        assert xs.min() >= 32 - 14 and xs.max() <= 32 + 14 and ys.max() <= 32 + 14, shape
    for a, b in itertools.combinations(masks, 2):
        overlap = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert overlap < 0.8, (a, b, overlap)


def test_wide_colours_are_apart_from_each_other_and_from_the_background() -> None:
    rgb = np.array(list(synth_draw.WIDE.rgb.values()), dtype=float)
    assert len(rgb) == 16
    for i, j in itertools.combinations(range(len(rgb)), 2):
        assert np.abs(rgb[i] - rgb[j]).max() >= 60, (i, j)
    # grey background pixels: every channel in 38..248, channels within 63 of each other
    low, high = synth.GREY_RANGE[0] - 32, synth.GREY_RANGE[1] + 63
    for color, value in synth_draw.WIDE.rgb.items():
        channels = np.array(value)
        saturated = channels.max() - channels.min() >= 90
        assert saturated or (channels < low).any() or (channels > high).any(), color


def test_a_wide_set_labels_its_anchor_among_256_classes(tmp_path: Path) -> None:
    summary = _generate(tmp_path, train_shards=1, samples_per_shard=200, val_samples=200,
                        palette="wide")  # fmt: skip
    assert summary["palette"] == "wide" and summary["num_classes"] == 256
    classnames = json.loads((tmp_path / "zeroshot.json").read_text())["classnames"]
    assert classnames == synth_draw.WIDE.classnames()
    held_out = set(synth_draw.WIDE.held_out_pairs())
    assert summary["held_out_classes"] == [f"{c} {s}" for c, s in synth_draw.WIDE.held_out_pairs()]
    train, val = _metas(tmp_path, "train"), _metas(tmp_path, "val")
    for meta in train + val:
        assert classnames[meta["label"]] == meta["classname"]
    assert all((o["color"], o["shape"]) not in held_out for m in train for o in m["objects"])
    anchors = {m["classname"] for m in train}
    assert len(anchors) > 120  # 200 scenes over 240 seen classes: few repeats
    assert {o["shape"] for m in val for o in m["objects"]} - set(synth.SHAPES)  # new shapes drawn
    with pytest.raises(ValueError, match="palette wide needs --kind compositional"):
        synth.generate(tmp_path / "s", train_shards=1, samples_per_shard=5, seed=0, palette="wide")
