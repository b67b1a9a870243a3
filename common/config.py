"""Config primitives: dataclass trees, `--set a.b=v` overrides, and (de)serialisation to dicts."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """Return (True, inner) for `X | None` / Optional[X], else (False, tp)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def parse_value(text: str, tp: Any, *, path: str) -> Any:
    """Parse the string `text` into a value of type `tp` (the annotation of field `path`)."""
    optional, inner = _is_optional(tp)
    if optional and text.strip().lower() in {"none", "null"}:
        return None
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"expected a boolean (true/false), got {text!r}")
        if inner in (int, float, str):
            return inner(text)
        if origin in (tuple, list):
            item_tp = typing.get_args(inner)[0] if typing.get_args(inner) else str
            raw = json.loads(text) if text.strip().startswith("[") else text.split(",")
            items = [
                parse_value(str(item).strip(), item_tp, path=path) for item in raw if str(item)
            ]
            return tuple(items) if origin is tuple else items
    except ValueError as exc:
        raise ValueError(f"cannot set {path}={text!r}: {exc}") from None
    raise ValueError(f"cannot set {path}: unsupported field type {inner!r}")


def apply_override(cfg: Any, assignment: str) -> None:
    """Apply one `a.b.c=value` assignment to a dataclass tree, in place."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like section.field=value")
    path, text = assignment.split("=", 1)
    node: Any = cfg
    parts = path.strip().split(".")
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ValueError(f"unknown config field {path!r}: {'.'.join(parts[:depth])} is a value")
        fields = {f.name for f in dataclasses.fields(node)}
        if name not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ValueError(
                f"unknown config field {path!r}: {where} has {', '.join(sorted(fields))}"
            )
        if depth == len(parts) - 1:
            tp = _field_types(type(node))[name]
            if dataclasses.is_dataclass(getattr(node, name)):
                raise ValueError(f"{path!r} is a section; set one of its fields")
            setattr(node, name, parse_value(text, tp, path=path))
        else:
            node = getattr(node, name)


def apply_overrides(cfg: T, assignments: list[str]) -> T:
    """Apply `a.b=v` assignments in order, then re-run every node's validation."""
    for assignment in assignments:
        apply_override(cfg, assignment)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Re-run `__post_init__` on every node of the tree (after fields were changed)."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    post_init = getattr(cfg, "__post_init__", None)
    if post_init is not None:
        post_init()


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-serialisable dict of a dataclass tree (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a dataclass tree of type `cls` from `to_dict` output; unknown keys are an error."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown fields for {cls.__name__}: {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value)
        elif typing.get_origin(_is_optional(tp)[1]) is tuple and value is not None:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
