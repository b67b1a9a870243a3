"""Hard-negative captions for training: a caption changed in one controlled way so that it is
(almost surely) false for its image, from the shard's JSON or made here from any English caption.

Three generators, after NegCLIP's and SugarCrepe's perturbations, each by small word lists:
    swap_attribute     two different words of one attribute class swapped: colours ("a red
                       cube and a blue ball" -> "a blue cube and a red ball"), else sizes, else
                       counts
    swap_object        two different nouns of the same number swapped ("a dog on a sofa" ->
                       "a sofa on a dog")
    replace_relation   a spatial relation replaced by its converse ("left of" -> "right of",
                       "on" -> "under", "above" -> "below", "in front of" -> "behind")
Each is guaranteed to differ from the caption (compared as the case-insensitive tokenizers see
it), or is not made: a caption with one colour has no swap_attribute.

Limits, by design (no tagger): a word counts as a noun, colour or relation by the lists below
alone, whatever its role in the sentence: "on" in "on a sunny day" is replaced as if it were a
relation, "orange" the fruit is a colour, a noun missing from the list is never swapped. Swaps
are of single words: "fire truck" is not one noun. Nouns are swapped only with nouns of the
same number (singular or plural), so that the result stays as fluent as the caption; a
negative that reads worse than the truth teaches the model grammar, not the image (the blind
control of train.evaluate shows whether that happened). English only.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from train.config import GENERATED_KINDS, HardNegativesConfig

__all__ = ["GENERATED_KINDS"]  # re-exported: the kinds data.hard_negatives.kinds may name

# fmt: off
COLOR_WORDS = frozenset(["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                         "black", "white", "gray", "grey", "silver", "gold"])
SIZE_WORDS = frozenset(["small", "large", "big", "little", "tiny", "huge", "tall", "short", "long",
                        "wide", "narrow"])
# "one" is left out: swapped with a plural count it would break the agreement with its noun
COUNT_WORDS = frozenset(["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])
ATTRIBUTE_CLASSES: tuple[frozenset[str], ...] = (COLOR_WORDS, SIZE_WORDS, COUNT_WORDS)

_SINGULAR_NOUNS = [
    "circle", "square", "triangle", "star", "cross", "cube", "ball", "sphere", "box", "block",
    "cylinder", "man", "woman", "boy", "girl", "person", "child", "baby", "player",
    "dog", "cat", "horse", "bird", "cow", "sheep", "elephant", "bear", "zebra", "giraffe", "duck",
    "fish", "mouse", "car", "bus", "truck", "bike", "bicycle", "motorcycle", "train", "plane",
    "boat", "table", "chair", "sofa", "couch", "bed", "desk", "bench", "shelf", "lamp", "door",
    "window", "cup", "mug", "plate", "bowl", "bottle", "glass", "fork", "knife", "spoon", "pizza",
    "cake", "apple", "banana", "sandwich", "book", "phone", "laptop", "computer", "keyboard",
    "screen", "clock", "vase", "kite", "umbrella", "bag", "hat", "shirt", "tree", "flower", "plant",
    "house", "building", "road", "street", "wall", "fence", "sign", "pole",
]
_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "person": "people",
                      "mouse": "mice", "fish": "fish", "sheep": "sheep", "knife": "knives",
                      "shelf": "shelves", "baby": "babies", "cross": "crosses", "box": "boxes",
                      "glass": "glasses", "bus": "buses", "couch": "couches", "bench": "benches",
                      "sandwich": "sandwiches", "watch": "watches"}
# fmt: on
SINGULAR_NOUNS = frozenset(_SINGULAR_NOUNS)
PLURAL_NOUNS = frozenset(_IRREGULAR_PLURALS.get(n, n + "s") for n in _SINGULAR_NOUNS)

# A relation (a word sequence) and what replaces it: its converse. Longer phrases are matched
# first, so "on top of" is never read as "on".
RELATION_CONVERSES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("left", "of"): ("right", "of"),
    ("right", "of"): ("left", "of"),
    ("above",): ("below",),
    ("below",): ("above",),
    ("over",): ("under",),
    ("under",): ("on",),
    ("beneath",): ("on", "top", "of"),
    ("on", "top", "of"): ("under",),
    ("on",): ("under",),
    ("in", "front", "of"): ("behind",),
    ("behind",): ("in", "front", "of"),
    ("inside",): ("outside",),
    ("outside",): ("inside",),
}
_RELATIONS_LONGEST_FIRST = sorted(RELATION_CONVERSES, key=len, reverse=True)

_WORD = re.compile(r"[A-Za-z]+")


class _Words:
    """A caption cut into words and what lies between them, so that edits keep the rest."""

    def __init__(self, caption: str) -> None:
        self.parts = _WORD.split(caption)  # separators, at even indices
        self.words = _WORD.findall(caption)
        self.lower = [w.lower() for w in self.words]

    def text(self, words: Sequence[str]) -> str:
        out = [self.parts[0]]
        for word, separator in zip(words, self.parts[1:], strict=True):
            out += [word, separator]
        return "".join(out)


def _same_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def _swap(words: _Words, i: int, j: int) -> str:
    swapped = list(words.words)
    swapped[i] = _same_case(words.lower[j], words.words[i])
    swapped[j] = _same_case(words.lower[i], words.words[j])
    return words.text(swapped)


def _swap_within(
    words: _Words, classes: Sequence[frozenset[str]], rng: random.Random
) -> str | None:
    """Swap two different words of the first class that has two in the caption."""
    for members in classes:
        found = [i for i, w in enumerate(words.lower) if w in members]
        pairs = [(i, j) for i in found for j in found if i < j and words.lower[i] != words.lower[j]]
        if pairs:
            return _swap(words, *rng.choice(pairs))
    return None


def swap_attribute(caption: str, rng: random.Random) -> str | None:
    """Two different colour (else size, else count) words of the caption swapped; None if none."""
    return _swap_within(_Words(caption), ATTRIBUTE_CLASSES, rng)


def swap_object(caption: str, rng: random.Random) -> str | None:
    """Two different nouns of the same number swapped; None if the caption has no such pair."""
    words = _Words(caption)
    pairs = [
        (i, j)
        for nouns in (SINGULAR_NOUNS, PLURAL_NOUNS)
        for i, a in enumerate(words.lower)
        for j, b in enumerate(words.lower)
        if i < j and a != b and a in nouns and b in nouns
    ]
    return _swap(words, *rng.choice(pairs)) if pairs else None


def _relations(lower: list[str]) -> list[tuple[int, tuple[str, ...]]]:
    """(start, phrase) of each relation in the words, longest match first, not overlapping."""
    found, taken = [], [False] * len(lower)
    for phrase in _RELATIONS_LONGEST_FIRST:
        for start in range(len(lower) - len(phrase) + 1):
            span = range(start, start + len(phrase))
            if tuple(lower[start : start + len(phrase)]) == phrase and not any(
                taken[k] for k in span
            ):
                found.append((start, phrase))
                for k in span:
                    taken[k] = True
    return found


def replace_relation(caption: str, rng: random.Random) -> str | None:
    """One spatial relation of the caption replaced by its converse; None if it has none."""
    words = _Words(caption)
    found = _relations(words.lower)
    if not found:
        return None
    start, phrase = rng.choice(sorted(found))
    converse = list(RELATION_CONVERSES[phrase])
    converse[0] = _same_case(converse[0], words.words[start])
    stop = start + len(phrase)
    pieces = [words.parts[0]]  # parts[k] precedes word k, parts[k + 1] follows it
    for k, word in enumerate(words.words):
        if k == start:
            pieces.append(" ".join(converse))  # the converse may differ in length
        if not start <= k < stop:
            pieces.append(word)
        if not start <= k < stop - 1:
            pieces.append(words.parts[k + 1])
    return "".join(pieces)


GENERATORS: dict[str, Callable[[str, random.Random], str | None]] = {
    "swap_attribute": swap_attribute,
    "swap_object": swap_object,
    "replace_relation": replace_relation,
}


def normalised(caption: str) -> str:
    """The caption as case-insensitive tokenizers see it: lower case, single spaces."""
    return " ".join(caption.lower().split())


def generate(caption: str, kinds: Sequence[str], rng: random.Random) -> dict[str, str]:
    """kind -> negative for each of `kinds` the caption allows, each different from it."""
    out = {}
    for kind in kinds:
        negative = GENERATORS[kind](caption, rng)
        if negative is not None and normalised(negative) != normalised(caption):
            out[kind] = negative
    return out


def shard_negatives(meta: Mapping[str, Any], scan: int) -> list[str]:
    """The captions of a sample JSON's "hard_negatives" (a list, or kind -> caption as
    `train.synth --kind compositional` writes), at most the first `scan` entries looked at;
    entries that are not strings are left out. Anything else: none."""
    found = meta.get("hard_negatives")
    if isinstance(found, dict):
        found = list(itertools.islice(found.values(), scan))
    if not isinstance(found, list):
        return []
    return [value for value in found[:scan] if isinstance(value, str)]


def sample_negatives(
    caption: str, meta: Mapping[str, Any], cfg: HardNegativesConfig, seed: int
) -> list[str]:
    """A training sample's hard negatives as `cfg` asks: the shard's and/or generated ones, none
    equal to the caption or longer than cfg.max_chars, no two alike, at most cfg.max_per_sample
    (drawn from `seed`'s stream when there are more, so each epoch may use others)."""
    rng = random.Random(seed)
    found = [] if cfg.generate == "always" else shard_negatives(meta, 8 * cfg.max_per_sample)
    kept = _usable(found, caption, cfg.max_chars)
    wanted = cfg.generate == "always" or (cfg.generate == "missing" and not kept)
    if wanted and len(caption) <= cfg.max_chars:  # a hostile caption costs no generator work
        kept = _usable(list(generate(caption, cfg.kinds, rng).values()), caption, cfg.max_chars)
    return rng.sample(kept, cfg.max_per_sample) if len(kept) > cfg.max_per_sample else kept


def _usable(candidates: list[str], caption: str, max_chars: int) -> list[str]:
    """The candidates that are non-empty, short enough and not the caption, each once."""
    truth = normalised(caption)
    stripped = (c.strip() for c in candidates if len(c) <= max_chars)
    return list(dict.fromkeys(c for c in stripped if c and normalised(c) != truth))
