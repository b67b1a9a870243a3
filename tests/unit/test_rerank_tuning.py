"""The rerank factor chosen at build time from measured recall; a search's bounded candidates."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve.indexing import rerank_tuning
from serve.indexing import vector_search as vs
from serve.indexing.index import IndexRow, SearchIndex, write_index
from serve.indexing.vector_search import IndexSpec, VectorSearcher, build_faiss_index, plan_index

DIM = 32
COUNT = 4000


def _spec(index_type: str = "ivfpq", **knobs: Any) -> IndexSpec:
    """Every cell searched: what is left for the factor to fix is the 4-bit codes' ranking."""
    if index_type == "ivfpq":
        knobs = {"nlist": 16, "nprobe": 16, **knobs}
    return IndexSpec(index_type=index_type, recall_queries=200, **knobs)


def _default_searcher(vectors: np.ndarray, rerank_factor: int) -> VectorSearcher:
    plan = plan_index(_spec(), len(vectors), DIM)
    index = build_faiss_index(plan, vectors)
    return VectorSearcher(
        vectors, index, search_params=plan.search_params, rerank_factor=rerank_factor
    )


def _sphere(rng: np.random.Generator, center: np.ndarray, n: int, noise: float) -> np.ndarray:
    x = center + noise * rng.standard_normal((n, DIM)) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """(stored vectors [COUNT, DIM] around one center, "text-like" queries [100, DIM]).

    The queries sit near the center, off the stored vectors' distribution, like a class prompt
    among the images of its class: thousands of near-equal neighbours, which 4-bit codes rank
    poorly (text recall@10 ~0.82 at the default x20, stored-image queries ~0.99)."""
    rng = np.random.default_rng(0)
    center = rng.standard_normal(DIM)
    center /= np.linalg.norm(center)
    return _sphere(rng, center, COUNT, 1.0), _sphere(rng, center, 100, 0.02)


def _build(out: Path, vectors: np.ndarray, texts: np.ndarray | None, **spec: Any) -> Any:
    """The manifest of the index written from `vectors` with `_spec(**spec)`."""
    rows = [IndexRow(f"k{i}", f"c{i}", {}) for i in range(len(vectors))]
    write_index(out, vectors, rows, spec=_spec(**spec), text_queries=texts)
    return json.loads((out / "index.json").read_text())


def _recall(index: SearchIndex, vectors: np.ndarray, queries: np.ndarray) -> float:
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    found = [{hit.id for hit in hits} for hits in index.search(queries, 10)]
    return float(
        np.mean([len(f & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)])
    )


def test_text_like_queries_raise_the_factor_until_the_target_and_the_service_uses_it(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, texts = data
    manifest = _build(tmp_path / "index", vectors, texts)
    steps = manifest["rerank_tuning"]["steps"]
    assert steps[0]["rerank_factor"] == 20 and steps[0]["text_recall_at_10"] < 0.95
    assert [s["rerank_factor"] for s in steps] == [20 * 2**i for i in range(len(steps))]
    assert manifest["rerank_factor"] == steps[-1]["rerank_factor"] > 20
    assert manifest["rerank_tuning"]["target_met"] and manifest["text_recall_at_10"] >= 0.95
    assert manifest["recall_at_10"] == steps[-1]["recall_at_10"] >= 0.95
    index = SearchIndex.load(tmp_path / "index", writable=False)
    try:  # the service searches with the chosen factor: the text queries get the target
        assert _recall(index, vectors, texts) >= 0.95
    finally:
        index.close()
    recall_at_default = vs.measure_query_recall(_default_searcher(vectors, 20), texts)
    assert recall_at_default is not None and recall_at_default < 0.95


def test_an_index_meeting_the_target_keeps_the_default(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, _ = data
    manifest = _build(tmp_path / "index", vectors, None)  # stored-image queries: ~0.99
    assert manifest["rerank_factor"] == 20
    tuning = manifest["rerank_tuning"]
    assert tuning["recall_target"] == 0.95 and tuning["target_met"]
    assert tuning["steps"] == [{"rerank_factor": 20, "recall_at_10": manifest["recall_at_10"]}]
    # a higher target asks for more: the same index is raised to reach it
    assert _build(tmp_path / "strict", vectors, None, recall_target=1.0)["rerank_factor"] > 20


def test_a_factor_the_user_gives_is_never_changed(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, texts = data
    manifest = _build(tmp_path / "index", vectors, texts, rerank_factor=20)
    assert manifest["rerank_factor"] == 20 and manifest["rerank_tuning"] is None
    assert manifest["text_recall_at_10"] < 0.95  # measured and reported, not acted on
    index = SearchIndex.load(tmp_path / "index", writable=False)
    try:
        assert _recall(index, vectors, texts) < 0.95
    finally:
        index.close()


def test_the_cap_reached_without_the_target_warns_and_still_writes_the_index(
    tmp_path: Path,
    data: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    vectors, texts = data
    monkeypatch.setattr(rerank_tuning, "RERANK_FACTOR_CAP", 40)
    with caplog.at_level(logging.WARNING, logger="serve.indexing.rerank_tuning"):
        manifest = _build(tmp_path / "index", vectors, texts)
    assert manifest["rerank_factor"] == 40 and not manifest["rerank_tuning"]["target_met"]
    assert [s["rerank_factor"] for s in manifest["rerank_tuning"]["steps"]] == [20, 40]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"text_recall_at_10 {manifest['text_recall_at_10']}" in warning
    assert "rerank factor 40 (the cap)" in warning and "--index-type hnsw" in warning
    assert "--on-disk" in warning
    SearchIndex.load(tmp_path / "index", writable=False).close()


def test_hnsw_above_the_target_keeps_its_default(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, texts = data
    manifest = _build(tmp_path / "index", vectors, texts, index_type="hnsw")
    assert manifest["rerank_factor"] == 2 and len(manifest["rerank_tuning"]["steps"]) == 1


def test_recall_target_is_validated() -> None:
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="recall_target must be in"):
            IndexSpec(recall_target=bad)


# --- a search's candidates stay bounded ----------------------------------------------------------


def test_candidates_are_clamped_to_a_fixed_maximum() -> None:
    assert vs.rerank_candidates(10, 20, 1_000_000) == 200
    assert vs.rerank_candidates(100, 200, 1_000_000) == vs.MAX_RERANK_CANDIDATES
    assert vs.rerank_candidates(10, 200, 500) == 500  # no more than are stored
    assert vs.rerank_candidates(10, 1, 1_000_000) == 10  # never fewer than k


def test_search_in_bounded_blocks_gives_the_same_results(
    data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, texts = data
    searcher = _default_searcher(vectors, 80)
    whole = searcher.search(texts, 10)
    monkeypatch.setattr(vs, "RERANK_BLOCK_ROWS", 1000)  # 800 candidates: one query at a time
    blocked = searcher.search(texts, 10)
    np.testing.assert_array_equal(whole[1], blocked[1])
    np.testing.assert_array_equal(whole[0], blocked[0])
