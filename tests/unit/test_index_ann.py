"""Approximate indices (HNSW, IVF-PQ + exact re-rank) against brute force; memory-mapped loads."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serve.indexing import index as index_module
from serve.indexing.index import FAISS_FILE, VECTORS_FILE, IndexRow, SearchIndex, write_index
from serve.indexing.vector_search import IndexSpec, plan_index

DIM = 64
COUNT = 20_000
CLUSTERS = 20


def _clustered(rng: np.random.Generator, centers: np.ndarray, n: int) -> np.ndarray:
    """A Gaussian mixture on the unit sphere: a center plus noise of about its own norm."""
    x = centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, DIM)) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """(stored [COUNT, DIM], fresh queries [200, DIM]) from the same clustered distribution."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CLUSTERS, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    return _clustered(rng, centers, COUNT), _clustered(rng, centers, 200)


@pytest.fixture(scope="module", params=["hnsw", "ivfpq"])
def built(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    data: tuple[np.ndarray, np.ndarray],
) -> Path:
    vectors, _ = data
    out = tmp_path_factory.mktemp(request.param) / "index"
    rows = [IndexRow(f"k{i}", f"c{i}", {}) for i in range(COUNT)]
    return write_index(out, vectors, rows, spec=IndexSpec(index_type=request.param))


@pytest.fixture()
def loaded(built: Path) -> Iterator[SearchIndex]:
    index = SearchIndex.load(built, mmap=False)
    yield index
    index.close()


def _exact_top10(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]  # [Q, 10]


def test_recall_against_exact_search(
    loaded: SearchIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, queries = data
    truth = _exact_top10(vectors, queries)
    results = loaded.search(queries, 10)
    found = [{h.id for h in hits} for hits in results]
    recall = np.mean([len(f & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.9, f"recall@10 {recall:.3f} of {loaded.manifest['factory']}"
    # Scores are exact cosine similarities (re-ranked against the stored vectors), best first.
    for q, hits in enumerate(results):
        ids = [h.id for h in hits]
        np.testing.assert_allclose(
            [h.score for h in hits], vectors[ids] @ queries[q], rtol=0, atol=1e-5
        )
        assert ids == sorted(ids, key=lambda i: -float(vectors[i] @ queries[q]))


def test_manifest_records_plan_and_measured_recall(loaded: SearchIndex) -> None:
    manifest = loaded.manifest
    assert (loaded.directory / FAISS_FILE).is_file()
    assert manifest["count"] == COUNT and manifest["dim"] == DIM
    assert manifest["recall_queries"] == 1000
    assert 0.9 <= manifest["recall_at_10"] <= 1.0
    assert loaded.describe()["recall_at_10"] == manifest["recall_at_10"]
    if manifest["index_type"] == "hnsw":
        assert manifest["factory"] == "HNSW32,SQ8"
        assert manifest["search_params"] == {"efSearch": 128}
    else:
        assert manifest["factory"] == "IVF512,PQ32x4fs"
        assert manifest["search_params"] == {"nprobe": 32}
    assert manifest["rerank_factor"] > 1


def test_mmap_load_gives_the_same_results(
    built: Path, loaded: SearchIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    _, queries = data
    mapped = SearchIndex.load(built, mmap=True, writable=False)  # a writer reads FAISS in
    assert mapped.describe()["mmap"]
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else None
    if maps is not None:  # the files themselves are mapped, not read
        assert str(built / FAISS_FILE) in maps and str(built / VECTORS_FILE) in maps
    pairs = zip(loaded.search(queries, 10), mapped.search(queries, 10), strict=True)
    for in_memory, from_map in pairs:
        assert [(h.id, h.score) for h in in_memory] == [(h.id, h.score) for h in from_map]
    np.testing.assert_array_equal(mapped.vectors([5, 9]), loaded.vectors([5, 9]))
    mapped.close()


def test_mmap_is_chosen_by_size(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not SearchIndex.load(built).mmap  # a few MB, well under the threshold
    monkeypatch.setattr(index_module, "MMAP_AUTO_BYTES", 1)
    assert SearchIndex.load(built).mmap


def test_concurrent_searches_agree_with_sequential(
    loaded: SearchIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    _, queries = data
    expected = [[h.id for h in hits] for hits in loaded.search(queries, 10)]

    def one(q: int) -> list[int]:
        return [h.id for h in loaded.search(queries[q : q + 1], 10)[0]]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(one, range(len(queries)))) == expected


# --- plans: what is built for how many vectors -------------------------------------------------


def test_auto_plan_by_size() -> None:
    assert plan_index(IndexSpec(), 49_999, 128).index_type == "flat"
    hnsw = plan_index(IndexSpec(index_type="hnsw"), 1_000_000, 128)
    assert plan_index(IndexSpec(), 999_999, 128).index_type == "hnsw"
    assert plan_index(IndexSpec(), 1_000_000, 128).index_type == "ivfpq"
    assert (hnsw.index_type, hnsw.factory) == ("hnsw", "HNSW32,SQ8")
    assert hnsw.search_params == {"efSearch": 256}
    ivfpq = plan_index(IndexSpec(), 9_999_999, 128)
    assert (ivfpq.index_type, ivfpq.factory, ivfpq.on_disk) == ("ivfpq", "IVF16384,PQ64x4fs", False)
    assert ivfpq.search_params == {"nprobe": 128}
    # from 10M vectors the lists go on disk, with 8-bit codes of 4-dimensional sub-vectors
    on_disk = plan_index(IndexSpec(), 20_000_000, 128)
    assert (on_disk.factory, on_disk.on_disk) == ("IVF16384,PQ32x8", True)
    assert plan_index(IndexSpec(on_disk=True), 100_000, 512).factory == "IVF1024,PQ128x8"
    assert not plan_index(IndexSpec(on_disk=False), 20_000_000, 128).on_disk


def test_explicit_knobs_win() -> None:
    spec = IndexSpec(index_type="ivfpq", nlist=100, pq_m=32, pq_nbits=8, nprobe=7, rerank_factor=3)
    plan = plan_index(spec, 50_000, 128)
    assert plan.factory == "IVF100,PQ32x8"
    assert (plan.search_params, plan.rerank_factor) == ({"nprobe": 7}, 3)


@pytest.mark.parametrize(
    ("spec", "count", "message"),
    [
        (dict(index_type="annoy"), 10, "index_type must be one of auto, flat, hnsw, ivfpq"),
        (dict(index_type="hnsw", ef_search=0), 10, "ef_search must be >= 1, got 0"),
        (dict(index_type="ivfpq", pq_m=5), 10_000, "pq_m must divide the dimension 128, got 5"),
        (dict(index_type="ivfpq"), 10, "needs at least 16 vectors, got 10; use --index-type flat"),
        (dict(index_type="hnsw", on_disk=True), 10, "on_disk is an ivfpq tier, not hnsw"),
        (dict(on_disk=True, pq_nbits=4), 10, "on_disk stores 8-bit codes, got pq_nbits=4"),
    ],
)
def test_bad_spec_is_refused(spec: dict[str, object], count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_index(IndexSpec(**spec), count, 128)  # type: ignore[arg-type]
