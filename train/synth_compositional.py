"""Compositional scenes, the harder synthetic benchmark of `train.synth --kind compositional`.

Each image holds two or three objects, one per quadrant of a noisy grey background: exactly one
large object (the anchor) and one or two small ones, each a shape and colour of the set's palette
(train/synth_draw.py: basic, the 30 classes of train.synth, or wide, 256). The
caption puts the anchor and one small object in a spatial relation, naming both objects' size,
colour and shape, and then names the third object, if any:

    "a large red circle left of a small blue square, and a small green star"

Three things make it hard where one shape per image is not:
- Binding: every caption holds two or three colours and shapes; only their order and relation say
  which goes with which, and a bag of words cannot tell the hard negatives below from the truth.
- Held-out combinations (CLEVR-CoGenT style): the colour–shape pairs of HELD_OUT_PAIRS never occur
  in train, as any object. Half of val has a held-out anchor ("held_out": true in its JSON), the
  other half only pairs seen in train, so val measures generalisation to new combinations.
- Zero-shot asks for the anchor's colour and shape ("a scene with a large {}."): the model must
  pick the large object out of the scene, not any object.

Hard negatives (SugarCrepe / ARO style): each val sample's JSON (and with `--train-negatives`
each train sample's, for loss.hard_negatives) maps a kind to a caption that
differs from the true one in one controlled way and is false for the image:
    swap_attribute     the two related objects' colours swapped (their sizes where the colours
                       are equal): "a large blue circle left of a small red square, ..."
    swap_object        their shapes swapped: "a large red square left of a small blue circle, ..."
    replace_relation   the opposite relation: "a large red circle right of a small blue square, ..."
A kind is left out of a sample where it would change nothing (swap_object between two objects of
one shape) rather than written as a wrong negative. Every negative is also checked against the
scene with `claim_holds`, which reads relations leniently (diagonal neighbours count), so one it
calls false is false however the relation is read; with one large object per scene, at the edge
of the grid the relation names, none of these kinds can come true, but the check keeps it so
should the layout change.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from train.synth_draw import (
    BASIC,
    COLOR_JITTER,
    GREY_RANGE,
    PALETTES,
    SPLITS,
    Palette,
    classname,
    draw_shape,
    noisy_background,
)

Pairs = tuple[tuple[str, str], ...]


@functools.cache
def pair_pools(palette_name: str) -> tuple[Pairs, Pairs, Pairs]:
    """(every colour-shape pair, the held-out ones, the seen ones) of a palette. One held-out
    shape per colour, every shape held out at least once (Palette.held_out_pairs): each
    held-out pair's colour and shape are both seen in train, only never together."""
    palette = PALETTES[palette_name]
    every, held_out = palette.pairs(), palette.held_out_pairs()
    return every, held_out, tuple(p for p in every if p not in held_out)


ALL_PAIRS, HELD_OUT_PAIRS, SEEN_PAIRS = pair_pools(BASIC.name)
VAL_HELD_OUT_FRACTION = 0.5  # val scenes whose anchor is a held-out pair
THREE_OBJECT_FRACTION = 0.5  # scenes with a third (small, unrelated) object
ANCHOR_SUBJECT_FRACTION = 0.5  # scenes whose anchor is the relation's subject, not reference

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
ROWS, COLUMNS = ("top", "bottom"), ("left", "right")
CELL_CENTERS = (0.25, 0.75)  # quadrant centre as a fraction of the side, for row/column 0 and 1
# Extent as a fraction of the image side: a large object nearly fills its quadrant, a small one
# fills under half of it, so sizes differ at a glance even at 64 px.
SCENE_SIZE_FRACTIONS: dict[str, tuple[float, float]] = {
    "small": (0.16, 0.22),
    "large": (0.38, 0.44),
}
SCENE_CENTER_JITTER = 0.03  # ± fraction of the side; objects stay inside their quadrants

# Every template names both related objects in full and the relation, so each hard negative
# renders differently from the truth. The longest caption is 18 tokens: it fits the bundled
# models' 20-token context (with start and end) untruncated.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {subject} {relation} a {reference}",
    "the {subject} is {relation} the {reference}",
    "{subject} {relation} {reference}",
    "a {reference} with a {subject} {relation} it",
)
THIRD_OBJECT_TEMPLATES: tuple[str, ...] = (", and a {}", " and a {}", ", plus a {}")
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a scene with a large {}.",
    "a large {}.",
    "a large {} next to small shapes.",
    "there is a large {}.",
)
HARD_NEGATIVE_KINDS: tuple[str, ...] = ("swap_attribute", "swap_object", "replace_relation")
# rng.random() draws per scene, all at once (per-call overhead dominates at 64 px). The scene's:
# held-out coin, object count, relation, anchor's role, the pair's row (column), the third
# object's cell, wording, the third object's wording, grey level; then per object (three, used or
# not, so every scene draws alike): colour-shape pair, extent, centre x, y, colour jitter r, g, b.
_SCENE_SCALARS = 9
_OBJECT_SCALARS = 7


def _object_draws(u: list[float], index: int) -> list[float]:
    """The uniform draws of object `index` among the scene's draws `u`."""
    start = _SCENE_SCALARS + index * _OBJECT_SCALARS
    return u[start : start + _OBJECT_SCALARS]


class Noun(NamedTuple):
    """What a caption says of one object: its size, colour and shape."""

    size: str
    color: str
    shape: str

    def words(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True, slots=True)
class SceneObject:
    """One drawn object: what it is and where, as quadrant (row, column) with 0 = top / left."""

    noun: Noun
    cell: tuple[int, int]


class Claim(NamedTuple):
    """What a caption asserts: some `subject` object is `relation` some other `reference` one."""

    subject: Noun
    relation: str
    reference: Noun


def relation_holds(relation: str, first: tuple[int, int], second: tuple[int, int]) -> bool:
    """Whether the object in cell `first` is `relation` the one in cell `second`, read leniently.

    Any column further left counts as "left of", diagonal neighbours included; true captions only
    use objects in the same row (column), so they hold under the strict reading too.
    """
    (row1, col1), (row2, col2) = first, second
    return {"left of": col1 < col2, "right of": col1 > col2, "above": row1 < row2,
            "below": row1 > row2}[relation]  # fmt: skip


def claim_holds(claim: Claim, objects: list[SceneObject]) -> bool:
    """True if one object fits the claim's subject and another its reference, in its relation."""
    return any(
        a.noun == claim.subject
        and b.noun == claim.reference
        and relation_holds(claim.relation, a.cell, b.cell)
        for a, b in itertools.permutations(objects, 2)
    )


def negative_claims(claim: Claim) -> dict[str, Claim]:
    """The claim changed in one way per hard-negative kind; a swap of equal values is left out."""
    subject, reference = claim.subject, claim.reference
    negatives = {}
    for field in ("color", "size"):  # colours first: the size swap only where colours are equal
        if getattr(subject, field) != getattr(reference, field):
            negatives["swap_attribute"] = Claim(
                subject._replace(**{field: getattr(reference, field)}),
                claim.relation,
                reference._replace(**{field: getattr(subject, field)}),
            )
            break
    if subject.shape != reference.shape:
        negatives["swap_object"] = Claim(
            subject._replace(shape=reference.shape),
            claim.relation,
            reference._replace(shape=subject.shape),
        )
    negatives["replace_relation"] = claim._replace(relation=OPPOSITE_RELATION[claim.relation])
    return negatives


def render_caption(claim: Claim, third: Noun | None, template: int, third_template: int) -> str:
    """The caption of `claim` in wording `template`, naming the third object if there is one."""
    text = CAPTION_TEMPLATES[template].format(
        subject=claim.subject.words(),
        relation=claim.relation,
        reference=claim.reference.words(),
    )
    if third is not None:
        text += THIRD_OBJECT_TEMPLATES[third_template].format(third.words())
    return text


def _layout(relation: str, u_line: float, u_third: float) -> list[tuple[int, int]]:
    """Cells of the subject, the reference and a third object: the first two share a row
    (a column) for a horizontal (vertical) relation, subject on the side the relation names."""
    line = int(u_line * 2)
    if relation in ("left of", "right of"):
        subject_col = 0 if relation == "left of" else 1
        pair = [(line, subject_col), (line, 1 - subject_col)]
    else:
        subject_row = 0 if relation == "above" else 1
        pair = [(subject_row, line), (1 - subject_row, line)]
    free = [(row, col) for row in (0, 1) for col in (0, 1) if (row, col) not in pair]
    return [*pair, free[int(u_third * len(free))]]


def _choose_scene(
    u: list[float], split: str, palette: Palette
) -> tuple[list[SceneObject], str, bool]:
    """Objects in caption order (subject, reference[, third]), the relation, and whether the
    anchor is a held-out pair; `u` holds the scene's uniform draws."""
    every, held_out_pairs, seen = pair_pools(palette.name)
    held_out = split == "val" and u[0] < VAL_HELD_OUT_FRACTION
    anchor_pool = held_out_pairs if held_out else seen
    small_pool = every if held_out else seen  # train never sees a held-out pair
    n_objects = 3 if u[1] < THREE_OBJECT_FRACTION else 2
    relation = RELATIONS[int(u[2] * len(RELATIONS))]
    anchor = 0 if u[3] < ANCHOR_SUBJECT_FRACTION else 1  # the anchor is subject or reference
    cells = _layout(relation, u[4], u[5])
    objects = []
    for index in range(n_objects):
        size, pool = ("large", anchor_pool) if index == anchor else ("small", small_pool)
        color, shape = pool[int(_object_draws(u, index)[0] * len(pool))]
        objects.append(SceneObject(Noun(size, color, shape), cells[index]))
    return objects, relation, held_out


def _draw_objects(
    rng: np.random.Generator,
    image_size: int,
    objects: list[SceneObject],
    u: list[float],
    palette: Palette,
) -> tuple[Image.Image, list[dict]]:
    """The scene on a noisy background, and each object's JSON record (centre in side fractions)."""
    image = noisy_background(
        rng, image_size, int(GREY_RANGE[0] + (GREY_RANGE[1] - GREY_RANGE[0]) * u[8])
    )
    draw = ImageDraw.Draw(image)
    records = []
    for index, obj in enumerate(objects):
        v = _object_draws(u, index)
        low, high = SCENE_SIZE_FRACTIONS[obj.noun.size]
        row, col = obj.cell
        cx = CELL_CENTERS[col] + SCENE_CENTER_JITTER * (2 * v[2] - 1)
        cy = CELL_CENTERS[row] + SCENE_CENTER_JITTER * (2 * v[3] - 1)
        rgb = palette.rgb[obj.noun.color]
        fill = tuple(
            min(255, max(0, rgb[c] + round(COLOR_JITTER * (2 * v[4 + c] - 1)))) for c in range(3)
        )
        half_extent = (low + (high - low) * v[1]) * image_size / 2
        draw_shape(draw, obj.noun.shape, cx * image_size, cy * image_size, half_extent, fill)
        records.append({**obj.noun._asdict(), "cell": f"{ROWS[row]} {COLUMNS[col]}",
                        "center": [round(cx, 3), round(cy, 3)]})  # fmt: skip
    return image, records


def draw_scene(
    rng: np.random.Generator,
    image_size: int,
    *,
    split: str,
    negatives: bool | None = None,
    palette: Palette = BASIC,
) -> tuple[Image.Image, dict]:
    """Draw one scene of `split` ("train" or "val") with the colours and shapes of `palette`:
    an RGB image and its JSON attributes.

    objects[0] is `relation` objects[1] in the JSON; `label` is the anchor's colour–shape class.
    With `negatives` (None: val only) the sample also carries `hard_negatives` (kind ->
    caption), each checked false for the scene; writing them draws nothing from `rng`, so the
    images and captions are the same either way.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    u = rng.random(_SCENE_SCALARS + 3 * _OBJECT_SCALARS).tolist()
    objects, relation, held_out = _choose_scene(u, split, palette)
    image, records = _draw_objects(rng, image_size, objects, u, palette)
    claim = Claim(objects[0].noun, relation, objects[1].noun)
    third = objects[2].noun if len(objects) == 3 else None
    template = int(u[6] * len(CAPTION_TEMPLATES))
    third_template = int(u[7] * len(THIRD_OBJECT_TEMPLATES))
    anchor = next(obj.noun for obj in objects if obj.noun.size == "large")
    attributes = {
        "caption": render_caption(claim, third, template, third_template),
        "objects": records,
        "relation": relation,
        "label": palette.class_index(anchor.color, anchor.shape),
        "classname": classname(anchor.color, anchor.shape),
        "held_out": held_out,
    }
    if split == "val" if negatives is None else negatives:
        attributes["hard_negatives"] = {
            kind: render_caption(negative, third, template, third_template)
            for kind, negative in negative_claims(claim).items()
            if not claim_holds(negative, objects)
        }
    return image, attributes


def dataset_fields(palette: Palette = BASIC) -> dict:
    """What dataset.json adds for this kind: the kind, the palette and the held-out classes."""
    return {
        "kind": "compositional",
        "palette": palette.name,
        "held_out_classes": [classname(c, s) for c, s in pair_pools(palette.name)[1]],
    }
