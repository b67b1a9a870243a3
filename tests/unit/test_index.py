"""serve.indexing.index (exact search, metadata, errors) and serve.build_index over shards.

Approximate index types, recall and memory-mapping: test_index_ann.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from PIL import Image

from common.artifact import load_artifact, write_artifact
from common.model import build_model
from common.preprocess import load_image
from common.shards import iter_shards
from serve.encoder import Encoder
from serve.indexing import build as build_index_cli
from serve.indexing.build import build_index
from serve.indexing.index import (
    FAISS_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    VECTORS_FILE,
    IndexLoadError,
    IndexRow,
    SearchIndex,
    write_index,
)
from serve.indexing.vector_search import IndexSpec
from train import synth

DIM = 8


def _unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rows(n: int) -> list[IndexRow]:
    return [IndexRow(f"key-{i:03d}", f"caption {i}", {"i": i}) for i in range(n)]


@pytest.fixture()
def vectors() -> np.ndarray:
    return _unit_rows(np.random.default_rng(0), 20)  # [20, DIM]


@pytest.fixture()
def index(tmp_path: Path, vectors: np.ndarray) -> Iterator[SearchIndex]:
    write_index(tmp_path / "index", vectors, _rows(len(vectors)), {"model": {"name": "hand"}})
    loaded = SearchIndex.load(tmp_path / "index")
    yield loaded
    loaded.close()


def test_search_matches_brute_force(index: SearchIndex, vectors: np.ndarray) -> None:
    queries = _unit_rows(np.random.default_rng(1), 5)
    k = 7
    expected_scores = queries @ vectors.T  # [5, 20]
    expected_ids = np.argsort(-expected_scores, axis=1)[:, :k]
    for q, hits in enumerate(index.search(queries, k)):
        assert [h.id for h in hits] == expected_ids[q].tolist()
        np.testing.assert_allclose(
            [h.score for h in hits], expected_scores[q, expected_ids[q]], rtol=0, atol=1e-5
        )
        assert [h.key for h in hits] == [f"key-{i:03d}" for i in expected_ids[q]]


def test_exact_vector_is_its_own_top_hit(index: SearchIndex, vectors: np.ndarray) -> None:
    (hits,) = index.search(vectors[3:4], 1)
    assert hits[0].id == 3
    assert hits[0].score == pytest.approx(1.0, abs=1e-6)


def test_metadata_round_trip(tmp_path: Path) -> None:
    basis = np.eye(3, dtype=np.float32)
    rows: list[tuple[str, str, dict[str, Any]]] = [
        ("a", "ünïcödé caption", {"nested": {"list": [1, 2.5, None]}, "flag": True}),
        ("b", "second", {"url": "https://example.com/b.jpg"}),
        ("c", "third", {"classname": "red circle"}),
    ]
    write_index(tmp_path / "idx", basis, rows, {"skipped": {"corrupt_image": 2}})
    loaded = SearchIndex.load(tmp_path / "idx")
    (hits,) = loaded.search(basis[:1], 3)
    top = hits[0]
    assert (top.id, top.key, top.caption, top.meta, top.url) == (0, *rows[0], "")
    # The url column is filled from the JSON's url (img2dataset's layout) when not given.
    assert [h.url for h in hits if h.id == 1] == ["https://example.com/b.jpg"]
    assert loaded.manifest["skipped"] == {"corrupt_image": 2}
    assert loaded.manifest["count"] == loaded.count == 3
    assert loaded.manifest["dim"] == loaded.dim == 3
    assert loaded.manifest["index_type"] == "flat"
    loaded.close()


def test_vectors_rows_and_describe(index: SearchIndex, vectors: np.ndarray) -> None:
    np.testing.assert_array_equal(index.vectors([3, 0, 3]), vectors[[3, 0, 3]])
    assert index.vectors([]).shape == (0, DIM)
    for bad in (20, -1):
        with pytest.raises(KeyError, match=f"no item with id {bad}"):
            index.vectors([1, bad])
    assert index.rows([2, 99]) == {2: IndexRow("key-002", "caption 2", {"i": 2})}
    assert index.rows([]) == {}
    description = index.describe()
    assert description == {
        "count": 20,
        "dim": DIM,
        "index_type": "flat",
        "metric": "inner_product",
        "recall_at_10": 1.0,
        "text_recall_at_10": None,
        "on_disk": False,
        "model": "hand",
        "created": index.manifest["created"],
        "directory": str(index.directory),
        "mmap": False,
        "thumbnails": None,
        "filterable": {"i": "number"},
        "writable": True,
        "read_only_reason": None,
        "deleted_pending": 0,
        "journal_bytes": 0,
    }


def test_more_like_this_finds_the_row_itself(index: SearchIndex) -> None:
    (hits,) = index.search(index.vectors([7]), 3)
    assert hits[0].id == 7
    assert hits[0].score == pytest.approx(1.0, abs=1e-6)


def test_k_larger_than_count_returns_count(index: SearchIndex) -> None:
    (hits,) = index.search(_unit_rows(np.random.default_rng(2), 1), 1000)
    assert len(hits) == index.count == 20
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_searches_use_the_loaded_thread_count_on_any_thread(
    tmp_path: Path, vectors: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenMP keeps its thread count per thread: a search from a thread that never set it (the
    service's batcher and threadpool threads) still runs with the index's `threads`."""
    write_index(tmp_path / "idx", vectors, _rows(len(vectors)), {})
    threads = in_new_thread(faiss.omp_get_max_threads) + 1  # not a new thread's default

    during: list[int] = []
    knn = faiss.knn

    def observed_knn(*args: object, **kwargs: object) -> object:
        during.append(faiss.omp_get_max_threads())
        return knn(*args, **kwargs)

    def search_then_read() -> int:
        loaded.search(vectors[:1], 3)
        return faiss.omp_get_max_threads()

    monkeypatch.setattr(faiss, "knn", observed_knn)  # the exact search, observed
    loaded = SearchIndex.load(tmp_path / "idx", threads=threads)
    try:
        default = in_new_thread(faiss.omp_get_max_threads)
        assert in_new_thread(search_then_read) == default  # put back: torch shares OpenMP
        assert during == [threads]
    finally:
        loaded.close()


def in_new_thread(call: Callable[[], int]) -> int:
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


def test_dim_mismatch_is_refused(tmp_path: Path, index: SearchIndex) -> None:
    with pytest.raises(IndexLoadError, match=r"dim 8 .*embed_dim is 64"):
        SearchIndex.load(index.directory, expected_dim=64)
    with pytest.raises(ValueError, match=r"\[Q, 8\]"):
        index.search(np.zeros((1, 4), np.float32), 1)


@pytest.mark.parametrize("name", [VECTORS_FILE, FAISS_FILE, METADATA_FILE, MANIFEST_FILE])
def test_missing_or_corrupt_file_is_named(tmp_path: Path, vectors: np.ndarray, name: str) -> None:
    write_index(tmp_path / "idx", vectors, _rows(len(vectors)), spec=IndexSpec(index_type="hnsw"))
    (tmp_path / "idx" / name).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(IndexLoadError, match=name.replace(".", r"\.")):
        SearchIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / name).unlink()
    with pytest.raises(IndexLoadError, match=name.replace(".", r"\.")):
        SearchIndex.load(tmp_path / "idx")


def test_inconsistent_files_are_refused(tmp_path: Path, vectors: np.ndarray) -> None:
    write_index(tmp_path / "idx", vectors, _rows(len(vectors)))
    np.save(tmp_path / "idx" / VECTORS_FILE, vectors[:5])
    with pytest.raises(IndexLoadError, match=r"vectors\.npy has 5 vectors.* 20 rows"):
        SearchIndex.load(tmp_path / "idx")
    np.save(tmp_path / "idx" / VECTORS_FILE, vectors.astype(np.float64))
    with pytest.raises(IndexLoadError, match=r"float64 array .*expected C-ordered float32"):
        SearchIndex.load(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_FILE).read_text())
    (tmp_path / "idx" / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(IndexLoadError, match=r"format 1 is not supported .*rebuild"):
        SearchIndex.load(tmp_path / "idx")


def test_rows_must_match_embeddings(tmp_path: Path, vectors: np.ndarray) -> None:
    with pytest.raises(ValueError, match="3 metadata rows for 20 embeddings"):
        write_index(tmp_path / "idx", vectors, _rows(3))
    assert not (tmp_path / "idx").exists()


# --- build_index over synthetic shards ---------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_artifact(
        build_model("duet-micro"), tmp_path_factory.mktemp("model") / "artifact", provenance={}
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two synthetic shards of 6 samples, and a shard with one undecodable image and one good."""
    root = tmp_path_factory.mktemp("synth")
    synth.generate(root, train_shards=2, samples_per_shard=6, seed=0, val_samples=1, image_size=32)
    # Not a copy of a shard image: two equal vectors would tie for the top hit below.
    good_png = io.BytesIO()
    Image.new("RGB", (32, 32), (30, 175, 45)).save(good_png, format="PNG")
    members = {
        "bad-0000.jpg": b"this is not a jpeg",
        "bad-0000.txt": b"a broken image",
        "bad-0001.png": good_png.getvalue(),
        "bad-0001.txt": b"a good image in the bad shard",
    }
    with tarfile.open(root / "bad.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return f"{root}/train/shard-{{000000..000001}}.tar::{root}/bad.tar"


def test_build_index_counts_good_samples_and_skips_corrupt(
    tmp_path: Path, artifact: Path, shards: str
) -> None:
    summary = build_index(artifact, shards, tmp_path / "index", batch_size=4)
    assert summary["count"] == 6 + 6 + 1
    assert summary["skipped"] == {"corrupt_image": 1}
    index = SearchIndex.load(tmp_path / "index", expected_dim=64)
    manifest = json.loads((tmp_path / "index" / "index.json").read_text())
    assert manifest["count"] == 13
    assert manifest["skipped"] == {"corrupt_image": 1}
    assert manifest["model"] == {"name": "duet-micro", "embed_dim": 64, "artifact": str(artifact)}

    # The stored vector of a sample is the model's embedding of its image, with its metadata.
    sample = next(iter_shards(shards.split("::")[0], Counter()))
    encoder = Encoder(load_artifact(artifact))
    (hits,) = index.search(encoder.encode_images([load_image(sample.image)]), 1)
    assert hits[0].key == sample.key
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].caption == sample.caption
    # the sample's own fields, and where it came from: shard + member
    shard = Path(sample.url).name  # the file name: clients learn no server paths
    assert hits[0].meta == {**sample.meta, "shard": shard, "member": f"{sample.key}.jpg"}
    index.close()


def test_build_index_cli(
    tmp_path: Path, artifact: Path, shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(artifact), "--data", shards, "--out", str(tmp_path / "index")]
    assert build_index_cli.main([*argv, "--batch-size", "5"]) == 0
    assert "indexed 13 images (dim 64)" in capsys.readouterr().out
    assert SearchIndex.load(tmp_path / "index").count == 13
    assert build_index_cli.main([*argv[:2], "--data", str(tmp_path / "none.tar"), *argv[4:]]) == 2
    assert "not found" in capsys.readouterr().err


def test_build_index_cli_index_type_and_knobs(
    tmp_path: Path, artifact: Path, shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(artifact), "--data", shards, "--out", str(tmp_path / "index")]
    hnsw = [*argv, "--index-type", "hnsw", "--ef-search", "50", "--recall-target", "0.9"]
    assert build_index_cli.main(hnsw) == 0
    manifest = json.loads((tmp_path / "index" / "index.json").read_text())
    assert (manifest["index_type"], manifest["search_params"]) == ("hnsw", {"efSearch": 50})
    assert manifest["rerank_tuning"]["recall_target"] == 0.9
    assert manifest["recall_queries"] == 13 and manifest["recall_at_10"] is not None
    # and with text queries: every sample's caption through the text tower
    assert manifest["text_recall_queries"] == 13 and 0 < manifest["text_recall_at_10"] <= 1
    capsys.readouterr()
    # 13 vectors are too few to train an IVF-PQ index: a clear error, not a FAISS crash.
    assert build_index_cli.main([*argv, "--index-type", "ivfpq"]) == 2
    assert "needs at least 16 vectors, got 13; use --index-type flat" in capsys.readouterr().err
    assert build_index_cli.main([*argv, "--index-type", "hnsw", "--rerank-factor", "0"]) == 2
    assert "rerank_factor must be >= 1, got 0" in capsys.readouterr().err
    assert build_index_cli.main([*argv, "--recall-target", "1.5"]) == 2
    assert "recall_target must be in (0, 1], got 1.5" in capsys.readouterr().err
