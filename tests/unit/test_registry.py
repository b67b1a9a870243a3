"""IndexRegistry: named indices, leases that outlive a reload, closing after the last user."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from serve.indexing.index import IndexLoadError, SearchIndex, write_index
from serve.registry import IndexRegistry, UnknownIndexError

DIM = 8


def _index(path: Path, count: int) -> Path:
    vectors = np.eye(count, DIM, dtype=np.float32)
    return write_index(path, vectors, [(f"k{i}", f"caption {i}", {}) for i in range(count)])


def _is_closed(index: SearchIndex) -> bool:
    try:
        index.rows([0])
    except sqlite3.ProgrammingError:
        return True
    return False


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    return {"first": _index(tmp_path / "a", 3), "second": _index(tmp_path / "b", 5)}


def test_names_default_and_unknown(paths: dict[str, Path]) -> None:
    registry = IndexRegistry(paths, SearchIndex.load)
    assert registry.names == ["first", "second"] and registry.default_name == "first"
    with registry.lease(None) as index:
        assert index.count == 3
    with registry.lease("second") as index:
        assert index.count == 5
    with pytest.raises(UnknownIndexError, match="'third'.*first, second"):
        registry.resolve("third")
    described = registry.describe()
    assert list(described) == ["first", "second"]
    assert described["first"]["default"] and described["second"]["count"] == 5
    registry.close()


def test_reload_swaps_and_closes_the_old_one_after_its_last_user(
    paths: dict[str, Path], tmp_path: Path
) -> None:
    registry = IndexRegistry(paths, SearchIndex.load)
    with registry.lease("second") as old:
        _index(tmp_path / "b", 7)  # rebuilt in place (write_index renames atomically)
        assert registry.reload("second")["count"] == 7
        assert not _is_closed(old) and old.count == 5  # the request in flight keeps its version
        with registry.lease("second") as new:
            assert new.count == 7
    assert _is_closed(old)  # its last user is gone
    assert registry.counts() == {"first": 3, "second": 7}
    registry.close()
    assert _is_closed(new)


def test_failed_reload_keeps_the_loaded_version(paths: dict[str, Path], tmp_path: Path) -> None:
    registry = IndexRegistry(paths, SearchIndex.load)
    (tmp_path / "a" / "index.json").write_text("{broken")
    with pytest.raises(IndexLoadError):
        registry.reload("first")
    with registry.lease("first") as index:
        assert not _is_closed(index) and index.count == 3
    registry.close()


def test_a_failing_load_closes_what_was_loaded(paths: dict[str, Path], tmp_path: Path) -> None:
    loaded: list[SearchIndex] = []

    def load(path: Path) -> SearchIndex:
        loaded.append(SearchIndex.load(path))
        return loaded[-1]

    with pytest.raises(IndexLoadError):
        IndexRegistry({**paths, "missing": tmp_path / "nowhere"}, load)
    assert len(loaded) == 2 and all(_is_closed(index) for index in loaded)
