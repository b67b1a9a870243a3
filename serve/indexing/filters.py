"""Metadata filters: the filter language, and per-row columns of the fields it can test.

A filter is a JSON object; every entry is one field's conditions, and all of them must hold (AND):

    {"color": "red"}                          equality (a string, a number, true or false)
    {"label": {"in": [3, 7, 11]}}             one of these values
    {"year": {"gte": 2020, "lt": 2025}}       numeric range: gt, gte, lt, lte (together: AND)
    {"color": {"eq": "red"}, "year": {"gt": 2020}}

A row without the field (or with null there) matches no condition on it. Each condition counts
once, and each value of an `in` list once more, against the caller's limits (`max_conditions`,
`max_values`): testing a condition is one vectorised pass over the index's rows, so a filter's
cost is rows x conditions and the limits bound it.

Which fields can be filtered (`AttributeColumns`): the top-level fields of the rows' `meta`
whose values are scalars of one kind across the index: numbers (JSON numbers, and true/false
stored as 1/0; held as float64, NaN where missing; integers are exact up to 2^53) or strings
(dictionary-encoded to int32 codes, -1 where missing). Fields are considered in the order they
first appear, at most `MAX_FIELDS` of them; a considered field is *not* filterable when its values
mix kinds (a number in one row, a string in another), include lists or objects, when it has more
than `MAX_DISTINCT_STRINGS` distinct strings (keys, URLs, captions: too unique to be a filter,
and their dictionary would cost memory per row) or a string over `MAX_STRING_CHARS`. Memory is
at most 8 bytes x rows x `MAX_FIELDS` plus the dictionaries. The same rows give the same columns
whether built at once (`from_metas`) or row batch by row batch (`append`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

EQ, IN, GT, GTE, LT, LTE = "eq", "in", "gt", "gte", "lt", "lte"
OPERATORS = (EQ, IN, GT, GTE, LT, LTE)
RANGE_OPERATORS = (GT, GTE, LT, LTE)
NUMBER, STRING = "number", "string"
MAX_FIELDS = 32
"""Fields considered for filtering, in order of first appearance (bounds memory per row)."""
MAX_DISTINCT_STRINGS = 65_536
"""A string field with more distinct values than this is not filterable."""
MAX_STRING_CHARS = 256
"""A string field with a longer value than this is not filterable (a caption, not a tag)."""
ATTRIBUTES_FILE = "attributes.npz"


class FilterError(ValueError):
    """A filter that cannot be applied: malformed, over the limits, or naming an unknown field."""


Value = float | str


@dataclass(frozen=True, slots=True)
class Condition:
    """One test on one field: `op` is one of OPERATORS; `values` has one entry except for `in`."""

    field: str
    op: str
    values: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Filter:
    """Conditions that must all hold; hashable, so searches can cache the rows it selects."""

    conditions: tuple[Condition, ...] = ()


def parse_filter(raw: Any, *, max_conditions: int, max_values: int) -> Filter:
    """A filter object (module docstring) -> `Filter`; FilterError names what is wrong.

    Checks the shape and the limits only; which fields exist is `AttributeColumns.check`'s.
    """
    if not isinstance(raw, Mapping):
        raise FilterError(f"a filter is a JSON object of field conditions, got {_kind(raw)}")
    conditions: list[Condition] = []
    for name, spec in raw.items():
        if isinstance(spec, Mapping):
            if not spec:
                raise FilterError(f"field {name!r}: no condition given")
            conditions += [_condition(name, op, value) for op, value in spec.items()]
        else:
            conditions.append(_condition(name, EQ, spec))
    if len(conditions) > max_conditions:
        raise FilterError(
            f"{len(conditions)} conditions; the limit is {max_conditions} (max_filter_conditions)"
        )
    values = sum(len(c.values) for c in conditions if c.op == IN)
    if values > max_values:
        raise FilterError(
            f"{values} values in `in` lists; the limit is {max_values} (max_filter_values)"
        )
    return Filter(tuple(conditions))


def _condition(name: str, op: str, value: Any) -> Condition:
    if op not in OPERATORS:
        raise FilterError(
            f"field {name!r}: unknown operator {op!r}; use one of {', '.join(OPERATORS)}"
        )
    if op == IN:
        if not isinstance(value, list) or not value:
            raise FilterError(f"field {name!r}: `in` takes a non-empty list, got {_kind(value)}")
        return Condition(name, op, tuple(_scalar(name, op, v) for v in value))
    scalar = _scalar(name, op, value)
    if op in RANGE_OPERATORS and isinstance(scalar, str):
        raise FilterError(f"field {name!r}: `{op}` takes a number, got a string")
    return Condition(name, op, (scalar,))


def _scalar(name: str, op: str, value: Any) -> Value:
    """A JSON value a field can be compared with: a string or a finite number (bools as 1/0)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float) and math.isfinite(value):
        return float(value)
    raise FilterError(
        f"field {name!r}: `{op}` compares with strings, finite numbers or true/false, "
        f"got {_kind(value)}"
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


@dataclass(slots=True)
class _Column:
    """One filterable field: float64 values (NaN = missing) or int32 codes into `labels` (-1)."""

    kind: str | None  # NUMBER, STRING, or None while every row so far is missing
    values: np.ndarray
    labels: list[str] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)


def _missing(kind: str | None, count: int) -> np.ndarray:
    if kind == STRING:
        return np.full(count, -1, np.int32)
    return np.full(count, np.nan, np.float64)


@dataclass(frozen=True, slots=True)
class _State:
    """What `AttributeColumns` holds, replaced whole on each change so readers see one state."""

    count: int
    columns: dict[str, _Column]
    excluded: dict[str, str]  # considered but not filterable: the reason


class AttributeColumns:
    """Per-row columns of an index's filterable metadata fields (module docstring), and the
    row mask of a `Filter` over them: vectorised numpy, no Python per row at search time.

    Rows are index rows (positions), in order. Safe to read from many threads while one thread
    appends: every change builds new arrays and swaps them in with one assignment.
    """

    def __init__(self) -> None:
        self._state = _State(0, {}, {})

    @classmethod
    def from_metas(cls, metas: Sequence[Mapping[str, Any]]) -> AttributeColumns:
        columns = cls()
        columns.append(metas)
        return columns

    @property
    def count(self) -> int:
        return self._state.count

    def fields(self) -> dict[str, str]:
        """Filterable field -> "number" | "string" (fields no row has a value for are left out)."""
        return {name: c.kind for name, c in self._state.columns.items() if c.kind is not None}

    def append(self, metas: Sequence[Mapping[str, Any]]) -> None:
        """Add rows at the end, one per metadata dict (the rows added to the index)."""
        state = self._state
        columns, excluded = dict(state.columns), dict(state.excluded)
        batch = _collect(metas, state.count, columns, excluded)
        total = state.count + len(metas)
        for name in list(columns):
            old = columns[name]
            rows, values = batch.get(name, ([], []))
            try:
                new = _extend(old, state.count, len(metas), rows, values)
            except FilterError as exc:
                del columns[name]
                excluded[name] = str(exc)
                continue
            columns[name] = new
            assert len(new.values) == total
        self._state = _State(total, columns, excluded)

    def take(self, rows: np.ndarray) -> AttributeColumns:
        """New columns of these rows, in this order (compaction: the live rows); string values
        no kept row has are dropped. This object is unchanged."""
        state = self._state
        rows = np.asarray(rows, dtype=np.int64)
        columns = {name: _take(column, rows) for name, column in state.columns.items()}
        taken = AttributeColumns()
        taken._state = _State(len(rows), columns, dict(state.excluded))
        return taken

    def check(self, where: Filter) -> None:
        """FilterError naming the first field this index cannot filter, or a value of the wrong
        kind for its field."""
        state = self._state
        for condition in where.conditions:
            column = state.columns.get(condition.field)
            if column is None:
                raise FilterError(self._unknown(condition.field))
            if column.kind is None:
                continue
            strings = [isinstance(v, str) for v in condition.values]
            if column.kind == NUMBER and any(strings):
                raise FilterError(f"field {condition.field!r} holds numbers; got a string")
            if column.kind == STRING and not all(strings):
                raise FilterError(f"field {condition.field!r} holds strings; got a number")

    def _unknown(self, name: str) -> str:
        reason = self._state.excluded.get(name)
        known = ", ".join(sorted(self.fields())) or "none"
        why = f"not filterable ({reason})" if reason else "not a filterable field of this index"
        return f"field {name!r} is {why}; filterable fields: {known}"

    def mask(self, where: Filter) -> np.ndarray:
        """bool [count]: the rows where every condition of `where` holds."""
        self.check(where)
        state = self._state
        mask: np.ndarray | None = None
        for condition in where.conditions:
            hit = _test(state.columns[condition.field], condition, state.count)
            mask = hit if mask is None else np.logical_and(mask, hit, out=mask)
        return np.ones(state.count, bool) if mask is None else mask

    def save(self, path: Path) -> None:
        """Write to `path` (an .npz: arrays + a JSON header; read back without pickle)."""
        state = self._state
        header = {
            "count": state.count,
            "fields": [
                {"name": name, "kind": c.kind, "labels": c.labels}
                for name, c in state.columns.items()
            ],
            "excluded": state.excluded,
        }
        arrays: dict[str, Any] = {f"f{i}": c.values for i, c in enumerate(state.columns.values())}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        with open(path, "wb") as file:
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path: Path, count: int) -> AttributeColumns:
        """Read what `save` wrote; ValueError when it is unreadable or not `count` rows."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                arrays = {name: data[name] for name in data.files if name != "header"}
        except (OSError, KeyError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a readable attributes file: {exc}") from exc
        if header.get("count") != count:
            raise ValueError(f"{path} has {header.get('count')} rows; the index has {count}")
        columns = {}
        for i, spec in enumerate(header["fields"]):
            values = arrays.get(f"f{i}")
            expected = np.int32 if spec["kind"] == STRING else np.float64
            if values is None or values.shape != (count,) or values.dtype != expected:
                raise ValueError(f"{path}: column {spec['name']!r} is missing or malformed")
            labels = list(spec["labels"])
            codes = {label: code for code, label in enumerate(labels)}
            columns[spec["name"]] = _Column(spec["kind"], values, labels, codes)
        loaded = cls()
        loaded._state = _State(count, columns, dict(header["excluded"]))
        return loaded


def _collect(
    metas: Sequence[Mapping[str, Any]],
    count: int,
    columns: dict[str, _Column],
    excluded: dict[str, str],
) -> dict[str, tuple[list[int], list[Any]]]:
    """Per considered field, the (row in batch, value) pairs of `metas`; fields seen for the
    first time join `columns` (all earlier rows missing) while fewer than MAX_FIELDS are."""
    batch: dict[str, tuple[list[int], list[Any]]] = {}
    for row, meta in enumerate(metas):
        for name, value in meta.items():
            found = batch.get(name)
            if found is None:
                if name in excluded or (
                    name not in columns and len(columns) + len(excluded) >= MAX_FIELDS
                ):
                    continue
                if name not in columns:
                    columns[name] = _Column(None, _missing(None, count))
                found = batch[name] = ([], [])
            found[0].append(row)
            found[1].append(value)
    return batch


def _kind_of(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return STRING
    return NUMBER if isinstance(value, bool | int | float) else "other"


def _extend(old: _Column, old_count: int, n: int, rows: list[int], values: list[Any]) -> _Column:
    """`old` with `n` more rows, `values` at `rows` of them; FilterError: not filterable now."""
    kinds = [_kind_of(v) for v in values]
    seen = {k for k in kinds if k is not None} | ({old.kind} if old.kind else set())
    if "other" in seen:
        raise FilterError("it has lists or objects as values")
    if len(seen) > 1:
        raise FilterError("it has both numbers and strings as values")
    kind = seen.pop() if seen else None
    base = old.values if old.kind == kind else _missing(kind, old_count)
    grown = np.concatenate([base, _missing(kind, n)])
    at = np.asarray([r for r, k in zip(rows, kinds, strict=True) if k], np.int64) + old_count
    present = [v for v, k in zip(values, kinds, strict=True) if k]
    if kind == NUMBER:
        try:
            grown[at] = np.asarray([float(v) for v in present], np.float64)
        except OverflowError:
            raise FilterError("it has a number too large for a float") from None
        return _Column(kind, grown)
    labels, codes = old.labels, old.codes
    if kind == STRING:
        new = {v for v in present if v not in codes}
        if any(len(v) > MAX_STRING_CHARS for v in new):
            raise FilterError(f"it has strings over {MAX_STRING_CHARS} characters")
        if len(codes) + len(new) > MAX_DISTINCT_STRINGS:
            raise FilterError(f"it has over {MAX_DISTINCT_STRINGS} distinct values")
        if new:
            labels, codes = labels + sorted(new), dict(codes)
            codes.update((label, i) for i, label in enumerate(labels) if label not in codes)
        grown[at] = np.asarray([codes[v] for v in present], np.int32)
    return _Column(kind, grown, labels, codes)


def _take(column: _Column, rows: np.ndarray) -> _Column:
    values = column.values[rows]
    if column.kind != STRING:
        return _Column(column.kind, values)
    used = np.unique(values[values >= 0])
    remap = np.full(len(column.labels) + 1, -1, np.int32)  # the last entry: missing stays -1
    remap[used] = np.arange(len(used), dtype=np.int32)
    labels = [column.labels[i] for i in used.tolist()]
    codes = {label: i for i, label in enumerate(labels)}
    return _Column(STRING, remap[values], labels, codes)


def _test(column: _Column, condition: Condition, count: int) -> np.ndarray:
    """bool [count]: rows of `column` where `condition` holds (missing values never do)."""
    values, wanted = column.values, condition.values
    if column.kind is None:
        return np.zeros(count, bool)
    if column.kind == STRING:
        found = [column.codes[v] for v in wanted if isinstance(v, str) and v in column.codes]
        if not found:
            return np.zeros(count, bool)
        return values == found[0] if len(found) == 1 else np.isin(values, found)
    if condition.op == IN:
        return np.isin(values, np.asarray(wanted, np.float64))
    compare = {EQ: np.equal, GT: np.greater, GTE: np.greater_equal, LT: np.less, LTE: np.less_equal}
    return compare[condition.op](values, wanted[0])


def metas_of(rows: Iterable[Any]) -> list[Mapping[str, Any]]:
    """The `meta` dicts of index rows (anything with a `.meta`), for `AttributeColumns`."""
    return [row.meta if isinstance(row.meta, Mapping) else {} for row in rows]
