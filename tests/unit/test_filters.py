"""Metadata filters: the language (parse, limits, errors naming the field or operator), the
attribute columns against a plain Python reference, and filtered search against brute force:
exact for flat, recall for HNSW and IVF-PQ, k results whenever k rows match."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from serve.indexing import filters as filters_module
from serve.indexing.filtered_search import exact_allowed
from serve.indexing.filters import (
    ATTRIBUTES_FILE,
    AttributeColumns,
    Filter,
    FilterError,
    parse_filter,
)
from serve.indexing.index import IndexRow, SearchIndex, write_index
from serve.indexing.vector_search import IndexSpec, VectorSearcher, build_faiss_index, plan_index

LIMITS = {"max_conditions": 8, "max_values": 16}
COLORS = ["red", "green", "blue", "amber"]


def _parse(raw: Any) -> Filter:
    return parse_filter(raw, **LIMITS)


# --- the language ------------------------------------------------------------------------------


def test_parse_shapes() -> None:
    where = _parse({"color": "red", "year": {"gte": 2020, "lt": 2025}, "tag": {"in": ["a", 1]}})
    assert [(c.field, c.op, c.values) for c in where.conditions] == [
        ("color", "eq", ("red",)),
        ("year", "gte", (2020.0,)),
        ("year", "lt", (2025.0,)),
        ("tag", "in", ("a", 1.0)),
    ]
    assert _parse({"flag": True}).conditions[0].values == (1.0,)
    assert _parse({}).conditions == ()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1, 2], "a JSON object of field conditions, got a list"),
        ({"color": {"like": "r%"}}, "field 'color': unknown operator 'like'"),
        ({"year": {"gt": "2020"}}, "field 'year': `gt` takes a number"),
        ({"tag": {"in": "a"}}, "field 'tag': `in` takes a non-empty list"),
        ({"tag": {"in": []}}, "field 'tag': `in` takes a non-empty list"),
        ({"color": None}, "field 'color': `eq` compares with strings"),
        ({"color": {}}, "field 'color': no condition given"),
        ({"n": {"lt": float("nan")}}, "field 'n': `lt` compares"),
        ({f"f{i}": 1 for i in range(9)}, "9 conditions; the limit is 8"),
        ({"tag": {"in": list(range(17))}}, "17 values in `in` lists; the limit is 16"),
    ],
)
def test_bad_filters_name_what_is_wrong(raw: Any, message: str) -> None:
    with pytest.raises(FilterError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _parse(raw)


# --- attribute columns -------------------------------------------------------------------------


def _metas(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows with a string, an int, a float, a bool and sparse fields; some fields missing."""
    rng = np.random.default_rng(seed)
    metas = []
    for i in range(n):
        meta: dict[str, Any] = {
            "color": COLORS[rng.integers(4)],
            "year": int(rng.integers(2000, 2030)),
        }
        if rng.random() < 0.8:
            meta["price"] = round(float(rng.random() * 100), 2)
        if rng.random() < 0.5:
            meta["stock"] = bool(rng.random() < 0.5)
        meta["caption"] = f"unique {i}"
        meta["tags"] = ["a", "b"]  # a list: not filterable
        metas.append(meta)
    return metas


def _holds(meta: dict[str, Any], field: str, op: str, values: tuple[Any, ...]) -> bool:
    """The plain reference of one condition on one row."""
    value = meta.get(field)
    if value is None:
        return False
    if op == "in":
        return value in values
    return {"eq": value == values[0], "gt": value > values[0], "gte": value >= values[0],
            "lt": value < values[0], "lte": value <= values[0]}[op]  # fmt: skip


RANDOM_FILTERS = [
    {"color": "red"},
    {"color": {"in": ["red", "blue", "violet"]}},
    {"color": "violet"},
    {"year": {"gte": 2010, "lt": 2020}},
    {"year": {"in": [2001, 2005]}, "color": {"eq": "green"}},
    {"price": {"lte": 50}},
    {"price": {"gt": 20.5}, "stock": True},
    {"stock": False},
]


@pytest.mark.parametrize("raw", RANDOM_FILTERS)
def test_mask_equals_the_reference(raw: dict[str, Any]) -> None:
    metas = _metas(3000)
    columns = AttributeColumns.from_metas(metas)
    where = _parse(raw)
    expected = [all(_holds(m, c.field, c.op, c.values) for c in where.conditions) for m in metas]
    np.testing.assert_array_equal(columns.mask(where), expected)


def test_columns_kinds_and_what_is_not_filterable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filters_module, "MAX_DISTINCT_STRINGS", 100)
    metas = _metas(500) + [{"year": "unknown"}]  # year now mixes numbers and a string
    columns = AttributeColumns.from_metas(metas)
    assert columns.fields() == {"color": "string", "price": "number", "stock": "number"}
    for field, reason in [
        ("tags", "lists or objects"),
        ("caption", "over 100 distinct values"),
        ("year", "both numbers and strings"),
        ("nope", "not a filterable field of this index"),
    ]:
        with pytest.raises(
            FilterError, match=f"field '{field}' is .*{reason}.*filterable fields: color"
        ):
            columns.mask(_parse({field: 1}))
    with pytest.raises(FilterError, match="field 'color' holds strings; got a number"):
        columns.check(_parse({"color": 3}))
    with pytest.raises(FilterError, match="field 'price' holds numbers; got a string"):
        columns.check(_parse({"price": {"in": [1, "x"]}}))


def test_append_take_and_files_give_the_same_columns(tmp_path: Path) -> None:
    metas = _metas(2000, seed=1)
    whole = AttributeColumns.from_metas(metas)
    grown = AttributeColumns.from_metas(metas[:700])
    grown.append(metas[700:1500])
    grown.append(metas[1500:])
    whole.save(tmp_path / ATTRIBUTES_FILE)
    loaded = AttributeColumns.load(tmp_path / ATTRIBUTES_FILE, 2000)
    rows = np.random.default_rng(0).permutation(2000)[:900]
    taken = AttributeColumns.from_metas(metas).take(rows)
    for raw in RANDOM_FILTERS:
        where = _parse(raw)
        expected = whole.mask(where)
        np.testing.assert_array_equal(grown.mask(where), expected)
        np.testing.assert_array_equal(loaded.mask(where), expected)
        np.testing.assert_array_equal(taken.mask(where), expected[rows])
    assert grown.fields() == loaded.fields() == whole.fields()
    with pytest.raises(ValueError, match="has 2000 rows; the index has 5"):
        AttributeColumns.load(tmp_path / ATTRIBUTES_FILE, 5)


# --- filtered search ---------------------------------------------------------------------------

DIM, COUNT, CLUSTERS = 32, 20_000, 20


def _clustered(
    rng: np.random.Generator, centers: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centers), n)
    x = centers[labels] + rng.standard_normal((n, DIM)) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CLUSTERS, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)  # noise of about their norm
    vectors, clusters = _clustered(rng, centers, COUNT)
    queries, query_clusters = _clustered(rng, centers, 100)
    return {"vectors": vectors, "clusters": clusters, "queries": queries,
            "query_clusters": query_clusters, "bucket": rng.integers(0, 100, COUNT)}  # fmt: skip


def _brute_force(vectors: np.ndarray, queries: np.ndarray, allowed: np.ndarray, k: int) -> tuple:
    """Reference: all scores, disallowed rows out, sorted; at most k per query."""
    rows = np.flatnonzero(allowed)
    scores = queries @ vectors[rows].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), rows[order]


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.1, 0.01, 0.0004])
def test_flat_filtered_search_is_exact(data: dict[str, np.ndarray], fraction: float) -> None:
    vectors, queries = data["vectors"], data["queries"]
    allowed = np.random.default_rng(1).random(COUNT) < fraction
    k = 10
    scores, ids = VectorSearcher(vectors, None).search(queries, k, allowed=allowed)
    want_scores, want_ids = _brute_force(vectors, queries, allowed, k)
    found = min(k, int(allowed.sum()))
    np.testing.assert_array_equal(ids[:, :found], want_ids)
    torch.testing.assert_close(torch.from_numpy(scores[:, :found]), torch.from_numpy(want_scores))
    assert (ids[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()


def test_no_allowed_rows_and_all_allowed(data: dict[str, np.ndarray]) -> None:
    searcher = VectorSearcher(data["vectors"], None)
    scores, ids = searcher.search(data["queries"][:3], 5, allowed=np.zeros(COUNT, bool))
    assert (ids == -1).all() and np.isneginf(scores).all()
    _, every = searcher.search(data["queries"][:3], 5, allowed=np.ones(COUNT, bool))
    np.testing.assert_array_equal(every, searcher.search(data["queries"][:3], 5)[1])
    with pytest.raises(ValueError, match="allowed must be bool"):
        searcher.search(data["queries"][:3], 5, allowed=np.ones(7, bool))


@pytest.fixture(scope="module", params=["hnsw", "ivfpq"])
def ann(request: pytest.FixtureRequest, data: dict[str, np.ndarray]) -> VectorSearcher:
    plan = plan_index(IndexSpec(index_type=request.param), COUNT, DIM)
    index = build_faiss_index(plan, data["vectors"])
    return VectorSearcher(
        data["vectors"], index, search_params=plan.search_params, rerank_factor=plan.rerank_factor
    )


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.01])
def test_ann_filtered_recall(
    ann: VectorSearcher, data: dict[str, np.ndarray], fraction: float
) -> None:
    vectors, queries = data["vectors"], data["queries"]
    allowed = data["bucket"] < round(100 * fraction)
    _, ids = ann.search(queries, 10, allowed=allowed)
    _, truth = _brute_force(vectors, queries, allowed, 10)
    assert allowed[ids[ids >= 0]].all()
    assert (ids >= 0).all()  # k come back: at least 200 rows are allowed
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= 0.95, f"recall@10 {recall:.3f} at {fraction:.0%} allowed"


def test_ann_returns_k_when_the_allowed_rows_are_far(
    ann: VectorSearcher, data: dict[str, np.ndarray]
) -> None:
    """Allowed = three clusters (15% of the rows: approximate search), queries from the others:
    the probed cells hold none of them (the graph walk: few), and those queries still get k."""
    allowed = data["clusters"] < 3
    queries = data["queries"][data["query_clusters"] >= 3][:20]
    _, ids = ann.search(queries, 10, allowed=allowed)
    assert (ids >= 0).all() and allowed[ids].all()


def test_fewer_matching_than_k_returns_all_of_them(
    ann: VectorSearcher, data: dict[str, np.ndarray]
) -> None:
    allowed = np.zeros(COUNT, bool)
    allowed[[5, 500, 5000]] = True
    _, ids = ann.search(data["queries"][:4], 10, allowed=allowed)
    assert [sorted(row[row >= 0].tolist()) for row in ids] == [[5, 500, 5000]] * 4


def test_exact_allowed_blocks_merge(
    data: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many small score blocks (dense and sparse paths) give the same top k as one block."""
    from serve.indexing import filtered_search

    vectors, queries = data["vectors"], data["queries"]
    for fraction in (0.6, 0.05):
        allowed = np.random.default_rng(2).random(COUNT) < fraction
        whole = exact_allowed(vectors, queries, 10, allowed)
        monkeypatch.setattr(filtered_search, "SCORE_BLOCK_ELEMS", 1)  # blocks of 1024 rows
        blocks = exact_allowed(vectors, queries, 10, allowed)
        monkeypatch.undo()
        np.testing.assert_array_equal(blocks[1], whole[1])


# --- through SearchIndex -----------------------------------------------------------------------


@pytest.fixture()
def index(tmp_path: Path, data: dict[str, np.ndarray]) -> Iterator[SearchIndex]:
    vectors = data["vectors"][:2000]
    rows = [
        IndexRow(f"k{i}", f"c{i}", {"bucket": int(b), "color": COLORS[i % 4]})
        for i, b in enumerate(data["bucket"][:2000])
    ]
    write_index(tmp_path / "index", vectors, rows, spec=IndexSpec(index_type="flat"))
    loaded = SearchIndex.load(tmp_path / "index")
    yield loaded
    loaded.close()


@pytest.mark.parametrize("written", [True, False])
def test_search_index_where(index: SearchIndex, data: dict[str, np.ndarray], written: bool) -> None:
    if not written:  # an index written before attributes.npz existed builds them at load
        (index.directory / ATTRIBUTES_FILE).unlink()
        index = SearchIndex.load(index.directory)
    assert index.describe()["filterable"] == {"bucket": "number", "color": "string"}
    where = index.filter({"color": "red", "bucket": {"lt": 50}}, **LIMITS)
    (hits,) = index.search(data["queries"][:1], 8, where=where)
    allowed = (np.arange(2000) % 4 == 0) & (data["bucket"][:2000] < 50)
    _, want = _brute_force(data["vectors"][:2000], data["queries"][:1], allowed, 8)
    assert [h.id for h in hits] == want[0].tolist()
    assert all(h.meta["color"] == "red" and h.meta["bucket"] < 50 for h in hits)
    with pytest.raises(FilterError, match="field 'size' is not a filterable field"):
        index.filter({"size": 3}, **LIMITS)
    if not written:
        index.close()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_filters_follow_adds_deletes_replay_and_compaction(tmp_path: Path, kind: str) -> None:
    """Added items are filterable at once, deleted ones never come back, and the columns
    survive a reload (journal replay) and a compaction (rows shift, ids stay)."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((3000, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    metas = [{"color": COLORS[i % 4], "n": i} for i in range(3000)]
    spec = IndexSpec(index_type=kind, nlist=32 if kind == "ivfpq" else None)
    write_index(
        tmp_path / "i", base, [IndexRow(f"k{i}", "", m) for i, m in enumerate(metas)], spec=spec
    )
    index = SearchIndex.load(tmp_path / "i")
    added = base[:50] + 0.01  # near existing rows, so they are found
    ids = index.add(added, [IndexRow(f"a{i}", "", {"color": "violet", "n": -i}) for i in range(50)])
    violet = index.filter({"color": "violet"}, **LIMITS)
    assert {h.id for h in index.search(base[:1], 100, where=violet)[0]} == set(ids)
    deleted, _ = index.delete(list(range(0, 3000, 2)) + ids[:10])  # the cached mask is stale
    queries = base[:20]

    def check(current: SearchIndex) -> None:
        where = current.filter({"color": {"in": ["red", "violet"]}}, **LIMITS)
        for hits in current.search(queries, 10, where=where):
            assert len(hits) == 10
            assert all(h.meta["color"] in ("red", "violet") and h.id not in deleted for h in hits)
        violet = current.filter({"color": "violet"}, **LIMITS)
        found = {h.id for h in current.search(queries[:1], 100, where=violet)[0]}
        assert found == set(ids[10:])  # all 40 live added items, nothing else

    check(index)
    index.close()
    index = SearchIndex.load(tmp_path / "i")  # the journal replayed
    check(index)
    index.compact()
    check(index)
    index.close()
    index = SearchIndex.load(tmp_path / "i")  # the compacted snapshot's attributes.npz
    assert (
        tmp_path / "i" / ATTRIBUTES_FILE
    ).is_file() and index.attributes.count == 3000 - 1500 + 40
    check(index)
    index.close()


def test_what_a_cached_mask_keeps(
    data: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only (cached) mask keeps its allowed rows' vectors, within the byte budget; the
    results are the same either way, and a writable mask keeps nothing."""
    from serve.indexing import filtered_search

    searcher = VectorSearcher(data["vectors"], None)
    queries = data["queries"][:5]
    allowed = data["bucket"] < 1
    allowed.flags.writeable = False
    first = searcher.search(queries, 10, allowed=allowed)
    kept = filtered_search._prepare(allowed).gathered
    assert kept is not None and kept.shape == (int(allowed.sum()), DIM)
    np.testing.assert_array_equal(searcher.search(queries, 10, allowed=allowed)[1], first[1])
    writable = allowed.copy()
    np.testing.assert_array_equal(searcher.search(queries, 10, allowed=writable)[1], first[1])
    assert filtered_search._prepare(writable).gathered is None
    monkeypatch.setattr(filtered_search, "GATHER_CACHE_BYTES", kept.nbytes)  # one fits, not two
    other = data["bucket"] == 1
    other.flags.writeable = False
    searcher.search(queries, 10, allowed=other)
    assert filtered_search._prepare(other).gathered is None
