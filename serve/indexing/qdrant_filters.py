"""Duet's filter language (serve/indexing/filters.py) translated to Qdrant's filter models.

A row's metadata lives in the point's payload under `meta`, so field `color` is Qdrant's key
`meta.color`. Which fields may be filtered, and their kind, is fixed when the collection is
written (`python -m serve.indexing.to_qdrant`: the index's filterable fields, each with a payload
index on a Qdrant server), so a filter is checked exactly as against the FAISS store:

    {"color": "red"}              match: value "red"
    {"label": {"in": [3, 7]}}     should: range 3 <= x <= 3, range 7 <= x <= 7
    {"year": {"gte": 2020}}       range: gte 2020
    {"flag": true}                should: match true, range 1 <= x <= 1

Numbers are compared as ranges, which match integer and float payloads alike (Qdrant's `match`
tells 3 from 3.0). Duet treats true/false as the numbers 1/0; Qdrant keeps booleans apart, so on
a field holding them an equality also matches the boolean. What has no faithful translation is a
`FilterError` (HTTP 422) saying why: a range on a field that holds true/false (Qdrant's ranges
skip booleans), and a field whose name Qdrant would read as a path (`.`, `[`, `]`, quotes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from qdrant_client import models

from serve.indexing.filters import (
    EQ,
    IN,
    NUMBER,
    STRING,
    Condition,
    Filter,
    FilterError,
    Value,
)

META = "meta"
"""The payload key holding a row's metadata object."""
_PLAIN_NAME = re.compile(r"[^.\[\]\"'\s]+")


def qdrant_filter(
    where: Filter, fields: Mapping[str, str], boolean_fields: frozenset[str]
) -> models.Filter | None:
    """`where` as a Qdrant filter (None: no condition); `fields`: filterable field -> kind
    ("number" | "string"); `boolean_fields`: those of them holding true/false."""
    check_filter(where, fields, boolean_fields)
    if not where.conditions:
        return None
    return models.Filter(must=[_condition(c, c.field in boolean_fields) for c in where.conditions])


def check_filter(where: Filter, fields: Mapping[str, str], boolean_fields: frozenset[str]) -> None:
    """FilterError naming the first condition that cannot be applied to this collection."""
    for condition in where.conditions:
        name = condition.field
        kind = fields.get(name)
        if kind is None:
            known = ", ".join(sorted(fields)) or "none"
            raise FilterError(
                f"field {name!r} is not a filterable field of this collection; "
                f"filterable fields: {known}"
            )
        strings = [isinstance(v, str) for v in condition.values]
        if kind == NUMBER and any(strings):
            raise FilterError(f"field {name!r} holds numbers; got a string")
        if kind == STRING and not all(strings):
            raise FilterError(f"field {name!r} holds strings; got a number")
        if not _PLAIN_NAME.fullmatch(name):
            raise FilterError(
                f"field {name!r} cannot be filtered with Qdrant: its name has a character "
                "Qdrant reads as part of a path (. [ ] quotes or space)"
            )
        if name in boolean_fields and condition.op not in (EQ, IN):
            raise FilterError(
                f"field {name!r} holds true/false: with Qdrant it can be tested with eq and in "
                f"only, not {condition.op}"
            )


def _condition(condition: Condition, boolean: bool) -> models.Condition:
    key = f"{META}.{condition.field}"
    values = condition.values
    if all(isinstance(v, str) for v in values):
        strings = [str(v) for v in values]
        if condition.op == IN:
            return models.FieldCondition(key=key, match=models.MatchAny(any=strings))
        return models.FieldCondition(key=key, match=models.MatchValue(value=strings[0]))
    if condition.op in (EQ, IN):
        equal: list[models.Condition] = []
        for value in values:
            equal += _number_equal(key, value, boolean)
        return equal[0] if len(equal) == 1 else models.Filter(should=equal)
    bound = float(values[0])
    return models.FieldCondition(key=key, range=models.Range(**{condition.op: bound}))


def _number_equal(key: str, value: Value, boolean: bool) -> list[models.Condition]:
    number = float(value)
    equal: list[models.Condition] = [
        models.FieldCondition(key=key, range=models.Range(gte=number, lte=number))
    ]
    if boolean and number in (0.0, 1.0):
        equal.append(models.FieldCondition(key=key, match=models.MatchValue(value=bool(number))))
    return equal
