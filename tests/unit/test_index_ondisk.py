"""The on-disk IVF-PQ tier: built in blocks (or by parts, as torchrun's ranks do) and merged on
disk, served memory-mapped with anonymous memory that does not grow with the index, updated
beside its files (also over HTTP) and compacted into new lists; the metadata written in
batches; captions sampled in one pass."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.indexing import delta, ondisk, vector_search
from serve.indexing import index as index_module
from serve.indexing.build import sample_captions
from serve.indexing.filters import AttributeColumns
from serve.indexing.index import IndexRow, SearchIndex, write_index
from serve.indexing.part_lists import add_parts, train_lists
from serve.indexing.staging import Chunk, _merge_vectors, merge, write_chunk
from serve.indexing.vector_search import (
    IndexSpec,
    VectorSearcher,
    measure_query_recall,
    plan_index,
)
from serve.settings import Settings
from tests.serve_support import (
    assert_same_hits,
    make_artifact,
    wait_until_loaded,
)

DIM = 64
COUNT = 12_000
# the same knobs for both builds: only where the lists live differs
SPEC: dict[str, Any] = dict(index_type="ivfpq", nlist=64, pq_m=16, pq_nbits=8, recall_queries=300)


def _clustered(
    rng: np.random.Generator, n: int, dim: int = DIM, *, noise: float = 0.6
) -> np.ndarray:
    centers = np.random.default_rng(1).standard_normal((30, dim))
    x = centers[rng.integers(0, 30, n)] + rng.standard_normal((n, dim)) * noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _rows(n: int) -> list[IndexRow]:
    return [IndexRow(f"k{i}", f"caption {i}", {}) for i in range(n)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """(in-memory index, on-disk index built in 5 blocks from memory-mapped parts, vectors)."""
    root = tmp_path_factory.mktemp("ondisk")
    vectors = _clustered(np.random.default_rng(0), COUNT)
    in_memory = write_index(root / "mem", vectors, _rows(COUNT), spec=IndexSpec(**SPEC))
    # parts as the build's staging merge leaves them: one memory-mapped .npy, part by part
    parts = np.array_split(vectors, 3)
    merged = _merge_vectors(root / "merged.npy", parts, DIM)
    assert isinstance(merged, np.memmap)
    original = ondisk.BLOCK_ROWS
    ondisk.BLOCK_ROWS = 2_500  # 5 blocks, each its own lists on disk before the merge
    try:
        spec = IndexSpec(**SPEC, on_disk=True)
        on_disk = write_index(root / "disk", merged, _rows(COUNT), spec=spec)
    finally:
        ondisk.BLOCK_ROWS = original
    return in_memory, on_disk, vectors


def test_on_disk_build_agrees_with_in_memory(builds: tuple[Path, Path, np.ndarray]) -> None:
    in_memory, on_disk, vectors = builds
    manifests = [json.loads((d / "index.json").read_text()) for d in (in_memory, on_disk)]
    assert [m["on_disk"] for m in manifests] == [False, True]
    assert manifests[0]["factory"] == manifests[1]["factory"] == "IVF64,PQ16x8"
    assert manifests[1]["recall_at_10"] >= manifests[0]["recall_at_10"] - 0.02
    assert manifests[1]["recall_at_10"] >= 0.9
    assert (on_disk / "index.ivfdata").is_file() and not list(on_disk.glob("block-*"))
    queries = _clustered(np.random.default_rng(5), 100)
    a, b = SearchIndex.load(in_memory, mmap=False), SearchIndex.load(on_disk)
    try:
        ids_a = [[h.id for h in hits] for hits in a.search(queries, 10)]
        ids_b = [[h.id for h in hits] for hits in b.search(queries, 10)]
    finally:
        a.close()
        b.close()
    same = sum(len(set(x) & set(y)) for x, y in zip(ids_a, ids_b, strict=True))
    assert same / 1000 >= 0.97


def test_on_disk_index_is_served_memory_mapped(builds: tuple[Path, Path, np.ndarray]) -> None:
    _, on_disk, vectors = builds
    index = SearchIndex.load(on_disk, mmap=False, writable=False)  # mapped whatever is asked
    try:
        assert delta.lists_on_disk(index._searcher.index)
        assert isinstance(index._searcher.vectors, np.memmap)  # the re-rank reads pages
        assert index.mmap and not index.writable
        (hits,) = index.search(vectors[7:8], 5)
        assert (hits[0].id, hits[0].caption) == (7, "caption 7")
        # re-ranked against the float16 vectors: the cosine within float16's rounding
        assert index._searcher.vectors.dtype == np.float16
        assert index.manifest["vectors_dtype"] == "float16"
        assert hits[0].score == pytest.approx(1.0, abs=2e-3)
    finally:
        index.close()


def test_appended_rows_read_like_one_array_and_search_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mapped float16 rows then added float32 rows, read by slices and row numbers as the
    concatenated array would be; exact search widens them block by block."""
    rng = np.random.default_rng(6)
    snapshot, added = _clustered(rng, 900).astype(np.float16), _clustered(rng, 250)
    rows = delta.AppendedRows(snapshot, added)
    whole = np.concatenate([snapshot.astype(np.float32), added])
    assert len(rows) == 1150 and rows.shape == (1150, DIM)
    for key in (slice(0, 10), slice(880, 920), slice(1000, 2000), slice(None, None, 7)):
        np.testing.assert_array_equal(rows[key], whole[key])
    picks = np.array([[0, 899], [900, 1149], [5, 1000]])
    np.testing.assert_array_equal(rows[picks], whole[picks])
    with pytest.raises(IndexError):
        rows[np.array([1150])]
    queries = _clustered(rng, 7)
    monkeypatch.setattr(vector_search, "EXACT_BLOCK_ROWS", 300)  # blocks across the seam
    scores, ids = vector_search.exact_knn(queries, rows, 10)
    want_scores, want_ids = faiss.knn(queries, whole, 10, faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)


def _vm_flags(path: Path) -> list[set[str]]:
    """The VmFlags of each of this process's mappings of `path` (/proc/self/smaps)."""
    flags, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            current = fields[5] if len(fields) > 5 else None
        elif line.startswith("VmFlags:") and current == str(path):
            flags.append(set(fields[1:]))
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc")
def test_on_disk_vectors_are_mapped_for_random_reads(
    builds: tuple[Path, Path, np.ndarray],
) -> None:
    """MADV_RANDOM ("rr"): a re-rank reads its rows, not the readahead window around each
    (in a 2 GB memory cgroup at 10M x 512, p50 21 ms with it, 1.7 s without)."""
    in_memory, on_disk, _ = builds
    index = SearchIndex.load(on_disk, writable=False)
    mapped = SearchIndex.load(in_memory, mmap=True, writable=False)  # scanned in order: default
    try:
        assert [f for f in _vm_flags(on_disk / "vectors.npy") if "rr" in f]
        assert _vm_flags(in_memory / "vectors.npy")
        assert not [f for f in _vm_flags(in_memory / "vectors.npy") if "rr" in f]
    finally:
        index.close()
        mapped.close()


def _live_exact(live: dict[int, np.ndarray], queries: np.ndarray, k: int) -> list[set[int]]:
    ids = np.array(sorted(live))
    order = np.argsort(-(queries @ np.stack([live[i] for i in ids]).T), axis=1)[:, :k]
    return [set(row) for row in ids[order].tolist()]


def _overlap(found: list[list[int]], truth: list[set[int]]) -> float:
    return sum(len(set(f) & t) for f, t in zip(found, truth, strict=True)) / sum(map(len, truth))


def test_on_disk_index_takes_adds_and_deletes_beside_its_files(tmp_path: Path) -> None:
    """Adds land in lists in memory, deletes are masked: the snapshot's lists and vectors files
    stay byte for byte; the journal replays them; a compaction writes new lists on disk."""
    rng = np.random.default_rng(3)
    base, added = _clustered(rng, 3000), _clustered(rng, 300)
    spec = IndexSpec(**{**SPEC, "nlist": 16, "recall_queries": 300}, on_disk=True)
    directory = write_index(tmp_path / "index", base, _rows(3000), spec=spec)
    files = {name: (directory / name).read_bytes() for name in ("index.ivfdata", "vectors.npy")}
    index = SearchIndex.load(directory)
    assert index.writable and index.mmap
    ids = index.add(added, [IndexRow(f"a{i}", f"added {i}", {}) for i in range(300)])
    assert ids == list(range(3000, 3300))
    live = {**dict(enumerate(base)), **dict(zip(ids, added, strict=True))}
    doomed = [*range(0, 3000, 10), *ids[:30]]
    assert index.delete(doomed) == (doomed, [])
    for item_id in doomed:
        del live[item_id]
    stored = index._searcher.vectors
    assert isinstance(stored, delta.AppendedRows) and isinstance(stored.snapshot, np.memmap)
    assert [h[0].id for h in index.search(added[30:60], 1)] == ids[30:60]  # each finds itself
    queries = _clustered(np.random.default_rng(4), 100)
    found = [[h.id for h in q] for q in index.search(queries, 10)]
    assert all(len(q) == 10 for q in found) and not {i for q in found for i in q} & set(doomed)
    assert _overlap(found, _live_exact(live, queries, 10)) >= 0.97
    assert {name: (directory / name).read_bytes() for name in files} == files
    index.close()

    index = SearchIndex.load(directory)  # the journal replayed: the same answers
    assert [[h.id for h in q] for q in index.search(queries, 10)] == found
    assert index.get(3100).caption == "added 100"
    index.compact()
    assert index.describe()["journal_bytes"] == 0 and index.describe()["deleted_pending"] == 0
    assert delta.lists_on_disk(index._searcher.index) and index.count == len(live) == 2970
    assert isinstance(index._searcher.vectors, np.memmap)
    assert index._searcher.vectors.dtype == np.float16
    assert (directory / "index.ivfdata").read_bytes() != files["index.ivfdata"]
    assert index.manifest["recall_at_10"] >= 0.9 and index.manifest["count"] == 2970
    after = [[h.id for h in q] for q in index.search(queries, 10)]
    assert _overlap(after, _live_exact(live, queries, 10)) >= 0.97
    assert index.get(3100).caption == "added 100" and index.get(1).caption == "caption 1"
    assert index.add(added[:1], _rows(1)) == [3300]
    index.close()


def test_text_query_recall_is_measured_against_exact_search() -> None:
    vectors = _clustered(np.random.default_rng(0), 4000, noise=2.0)
    queries = _clustered(np.random.default_rng(9), 50, noise=2.0)
    index = faiss.index_factory(DIM, "IVF32,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    exact = VectorSearcher(vectors, None)
    assert measure_query_recall(exact, queries) == 1.0
    rough = VectorSearcher(vectors, index, search_params={"nprobe": 1})
    recall = measure_query_recall(rough, queries)
    # the reference: overlap of brute-force top 10 with what the searcher returns
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    _, found = rough.search(queries, 10)
    expected = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall == pytest.approx(expected, abs=1e-4)
    assert recall is not None and recall < 1.0  # one cell of 32 misses neighbours
    assert measure_query_recall(rough, queries[:0]) is None


def test_exact_search_over_float16_blocks_matches_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = _clustered(np.random.default_rng(0), 3000)
    queries = _clustered(np.random.default_rng(9), 20)
    half = vectors.astype(np.float16)
    monkeypatch.setattr(vector_search, "EXACT_BLOCK_ROWS", 700)  # 5 blocks, the last short
    scores, ids = vector_search.exact_knn(queries, half, 10)
    want_scores, want_ids = faiss.knn(
        queries, half.astype(np.float32), 10, faiss.METRIC_INNER_PRODUCT
    )
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)


REPO = Path(__file__).resolve().parents[2]
RSS_PROBE = """
import sys, numpy as np
from serve.indexing.index import SearchIndex
index = SearchIndex.load(sys.argv[1], mmap=sys.argv[2] == "1", writable=False)
q = np.load(sys.argv[3])
for _ in range(3):
    index.search(q, 10)
for line in open("/proc/self/status"):
    if line.startswith("RssAnon:"):
        print(int(line.split()[1]))  # kB of memory not backed by a file
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_resident_memory_does_not_grow_with_the_index(tmp_path: Path) -> None:
    """Anonymous memory after load + search: an on-disk index 30x larger costs < 8 MB more
    (its ids and alive mask: 9 bytes per row), where one read into memory costs its size."""
    dim = 128
    rng = np.random.default_rng(0)
    queries = tmp_path / "q.npy"
    np.save(queries, _clustered(rng, 20, dim))
    spec = IndexSpec(**{**SPEC, "nlist": 32, "pq_m": 32, "recall_queries": 0}, on_disk=True)
    dirs = {}
    for n in (2_000, 60_000):  # 60k x 128 float32: 31 MB of vectors, 2 MB of codes
        dirs[n] = write_index(tmp_path / str(n), _clustered(rng, n, dim), _rows(n), spec=spec)

    def anon_kb(directory: Path, mmap: bool) -> int:
        command = [sys.executable, "-c", RSS_PROBE, str(directory), "1" if mmap else "0"]
        out = subprocess.run(
            [*command, str(queries)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            cwd=REPO,
        )
        return int(out.stdout.split()[-1])

    # mmap=False asked: an on-disk index is memory-mapped whatever the caller asks
    growth_mb = (anon_kb(dirs[60_000], False) - anon_kb(dirs[2_000], False)) / 1024
    assert growth_mb < 8, f"on-disk index: {growth_mb:.1f} MB more for 58k more rows"


def test_service_updates_an_on_disk_index(tmp_path: Path) -> None:
    """Over HTTP: searches answer from the on-disk lists; an added item is found, a deleted one
    is not."""
    vectors = _clustered(np.random.default_rng(2), 3000)  # duet-micro: D = 64
    spec = IndexSpec(**{**SPEC, "nlist": 16, "recall_queries": 0}, on_disk=True)
    index_dir = write_index(tmp_path / "index", vectors, _rows(3000), spec=spec)
    settings = Settings.model_validate(
        {"artifact_dir": make_artifact(tmp_path), "index_dir": index_dir}
    )
    new = _clustered(np.random.default_rng(8), 1)[0].tolist()
    with TestClient(create_app(settings)) as client:
        assert wait_until_loaded(client).status_code == 200
        response = client.post("/search", json={"embedding": vectors[42].tolist(), "k": 3})
        assert response.status_code == 200, response.text
        top = response.json()["results"][0]
        assert (top["id"], top["caption"]) == (42, "caption 42")
        info = client.get("/indices").json()
        assert '"on_disk": true' in json.dumps(info) and '"writable": true' in json.dumps(info)
        added = client.post("/indices/default/items", json={"items": [{"embedding": new}]})
        assert added.status_code == 200, added.text
        (item,) = added.json()["items"]
        found = client.post("/search", json={"embedding": new, "k": 1}).json()["results"]
        assert found[0]["id"] == item["id"] == 3000
        assert client.delete("/indices/default/items/42").status_code == 200
        again = client.post("/search", json={"embedding": vectors[42].tolist(), "k": 3})
        assert 42 not in [hit["id"] for hit in again.json()["results"]]


def test_lists_added_part_by_part_in_any_order_equal_the_block_build(
    tmp_path: Path, builds: tuple[Path, Path, np.ndarray]
) -> None:
    """What a torchrun build does (serve/indexing/part_lists.py), in one process: rank 0 trains,
    the ranks add their own parts (here the second rank finishes first), rank 0 merges."""
    _, on_disk, vectors = builds
    staging = tmp_path / "parts"
    staging.mkdir()
    for i, part in enumerate(np.array_split(vectors, 3)):
        first = sum(len(p) for p in np.array_split(vectors, 3)[:i])
        rows = [IndexRow(f"k{first + j}", f"caption {first + j}", {}) for j in range(len(part))]
        write_chunk(staging, i, Chunk(part, rows, Counter()))
    merged = merge(staging, 3, DIM, with_thumbnails=False)
    plan = plan_index(IndexSpec(**SPEC, on_disk=True), COUNT, DIM)
    lists = train_lists(staging, plan, merged.vectors, 3)
    assert lists.offsets == [0, 4000, 8000]
    assert add_parts(lists, [1]) == 4000  # rank 1 of 2
    assert add_parts(lists, [0, 2]) == 8000  # rank 0 of 2
    spec = IndexSpec(**SPEC, on_disk=True)
    by_parts = write_index(tmp_path / "index", merged.vectors, merged.rows, spec=spec, lists=lists)
    # every list holds its entries in id order, as one process adding every block leaves it
    assert (by_parts / "index.ivfdata").read_bytes() == (on_disk / "index.ivfdata").read_bytes()
    queries = _clustered(np.random.default_rng(5), 50)
    a, b = SearchIndex.load(on_disk), SearchIndex.load(by_parts)
    try:
        assert_same_hits(a, b, queries)
    finally:
        a.close()
        b.close()


def test_metadata_is_written_in_batches_not_held_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_index reads its rows (a build's: from the parts' files) ROW_BATCH at a time."""
    count = 20_000
    caption = "x" * 2_000  # 40 MB of captions if the rows were held together

    class Rows:
        def __len__(self) -> int:
            return count

        def __iter__(self) -> Iterator[IndexRow]:
            return (IndexRow(f"k{i}", f"{caption}{i}", {"n": i}) for i in range(count))

    monkeypatch.setattr(index_module, "ROW_BATCH", 500)
    tracemalloc.start()
    try:
        index_module._write_rows(tmp_path, Rows())
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 8 * 2**20, peak_bytes
    with sqlite3.connect(tmp_path / "metadata.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM items").fetchone() == (count,)
        assert db.execute("SELECT key, caption FROM items WHERE id = 12345").fetchone() == (
            "k12345",
            f"{caption}12345",
        )
    db.close()
    columns = AttributeColumns.load(tmp_path / "attributes.npz", count)
    assert columns.count == count and columns.fields() == {"n": "number"}


def test_captions_are_sampled_uniformly_in_one_pass_from_captioned_rows() -> None:
    rows = [IndexRow(f"k{i}", "" if i % 3 == 0 else f"c{i}", {}) for i in range(3000)]
    everything = sample_captions(iter(rows), 5000, seed=0)
    assert everything == [row.caption for row in rows if row.caption]  # all, in row order
    some = sample_captions(iter(rows), 200, seed=0)
    assert len(set(some)) == 200 and "" not in some
    assert some == sorted(some, key=lambda c: int(c[1:]))  # row order
    assert some == sample_captions(iter(rows), 200, seed=0) != sample_captions(rows, 200, seed=1)
    # uniform: each half of the captioned rows gives about half the sample
    first_half = sum(int(c[1:]) < 1500 for c in some)
    assert 70 <= first_half <= 130
