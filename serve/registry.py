"""`IndexRegistry`: the service's named indices, leased per request and reloadable from disk.

A request takes a *lease* on one index for as long as it uses it. `reload(name)` loads the new
index completely first (the old one keeps serving meanwhile), then swaps it in under a lock;
requests already holding the old one finish with it, and it is closed when the last of them
returns its lease. So a reload never fails a request and never closes an index under a reader.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.indexing.store import ServedIndex

log = logging.getLogger(__name__)

IndexLoader = Callable[[Path | str], ServedIndex]
"""Loads an index from its source: a directory (FAISS) or a collection name (Qdrant)."""


class UnknownIndexError(LookupError):
    """A request named an index that the service does not have."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"no index named {name!r}; indices: {', '.join(known)}")
        self.name = name


@dataclass(slots=True)
class _Slot:
    """One loaded version of an index and how many requests are using it."""

    index: ServedIndex
    users: int = 0
    retired: bool = False  # replaced by a reload: close when the last user is done


class IndexRegistry:
    """Named indices (`ServedIndex`); the first name is the default. Safe to use from any
    thread."""

    def __init__(self, paths: Mapping[str, Path | str], load: IndexLoader) -> None:
        """Load every index in `paths` (name -> directory or collection) with `load`; the first
        is the default."""
        if not paths:
            raise ValueError("an IndexRegistry needs at least one index")
        self._paths = dict(paths)
        self._load = load
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one reload at a time: no wasted double loads
        self._slots: dict[str, _Slot] = {}
        try:
            for name, path in self._paths.items():
                self._slots[name] = _Slot(load(path))
        except BaseException:
            self.close()
            raise

    @property
    def names(self) -> list[str]:
        return list(self._paths)

    @property
    def default_name(self) -> str:
        return next(iter(self._paths))

    def resolve(self, name: str | None) -> str:
        """`name`, or the default for None; `UnknownIndexError` if there is no such index."""
        if name is None:
            return self.default_name
        if name not in self._paths:
            raise UnknownIndexError(name, self.names)
        return name

    @contextmanager
    def lease(self, name: str | None = None) -> Iterator[ServedIndex]:
        """The current version of index `name` (default: the first), kept open until exit."""
        name = self.resolve(name)
        with self._lock:
            slot = self._slots[name]
            slot.users += 1
        try:
            yield slot.index
        finally:
            self._release(slot)

    def reload(self, name: str) -> dict[str, Any]:
        """Load index `name` from its source again and swap it in; returns its description.

        Raises what loading raises (the current version then stays in service, untouched).
        """
        name = self.resolve(name)
        with self._reload_lock:
            current = self._slots[name].index
            with current.paused_writes() as hand_over:  # no update lands between load and swap
                fresh = _Slot(self._load(self._paths[name]))
                hand_over(fresh.index)
                with self._lock:
                    old, self._slots[name] = self._slots[name], fresh
                    old.retired = True
                    close_now = old.users == 0
            if close_now:
                old.index.close()
            log.info(
                "reloaded index %r from %s: %d vectors", name, self._paths[name], fresh.index.count
            )
            return fresh.index.describe()

    def describe(self) -> dict[str, dict[str, Any]]:
        """`describe()` of each index by name, the default first."""
        described = {}
        for name in self.names:
            with self.lease(name) as index:
                described[name] = {"name": name, "default": name == self.default_name}
                described[name].update(index.describe())
        return described

    def counts(self) -> dict[str, int]:
        """Vectors per index, by name."""
        with self._lock:
            return {name: slot.index.count for name, slot in self._slots.items()}

    def close(self) -> None:
        """Close every index not in use now; those in use close when their last lease ends."""
        with self._lock:
            slots = list(self._slots.values())
            for slot in slots:
                slot.retired = True
            idle = [slot for slot in slots if slot.users == 0]
        for slot in idle:
            slot.index.close()

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.users -= 1
            close_now = slot.retired and slot.users == 0
        if close_now:
            slot.index.close()
