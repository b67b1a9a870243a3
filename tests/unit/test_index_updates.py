"""Adds and deletes on a loaded index: ids, per index type, journal replay, compaction, recall,
one writer, a full disk, and searches running beside updates."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from serve.indexing.index import IndexRow, SearchIndex, write_index
from serve.indexing.journal import (
    JOURNAL_FILE,
    IndexReadOnlyError,
    JournalWriteError,
    read_records,
)
from serve.indexing.vector_search import IndexSpec
from tests.conftest import REPO_ROOT, subprocess_env

DIM = 16


def unit(rng: np.random.Generator, count: int, dim: int = DIM) -> np.ndarray:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def rows(prefix: str, count: int) -> list[IndexRow]:
    return [IndexRow(f"{prefix}{i}", f"caption {prefix}{i}", {"n": i}) for i in range(count)]


def spec(kind: str) -> IndexSpec:
    return IndexSpec(index_type=kind, nlist=32 if kind == "ivfpq" else None)


def build(path: Path, vectors: np.ndarray, kind: str = "flat") -> SearchIndex:
    write_index(path, vectors, rows("k", len(vectors)), spec=spec(kind))
    return SearchIndex.load(path)


def exact_ids(live: dict[int, np.ndarray], queries: np.ndarray, k: int) -> list[list[int]]:
    """Brute-force top-k item ids over the live items."""
    ids = np.array(sorted(live))
    vectors = np.stack([live[i] for i in ids])
    order = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]
    return ids[order].tolist()


def test_flat_results_equal_a_rebuild_of_the_live_items(tmp_path: Path):
    rng = np.random.default_rng(0)
    base = unit(rng, 500)
    index = build(tmp_path / "index", base)
    live = dict(enumerate(base))
    added = unit(rng, 60)
    new_ids = index.add(added[:40], rows("a", 40))
    new_ids += index.add(added[40:], rows("b", 20))
    assert new_ids == list(range(500, 560))  # ids continue after the snapshot's
    live.update(zip(new_ids, added, strict=True))
    deleted, missing = index.delete([3, 7, 7, 510, 9999])
    assert (deleted, missing) == ([3, 7, 510], [9999])
    for i in deleted:
        del live[i]
    assert index.count == len(live) == 557
    queries = unit(rng, 30)
    hits = index.search(queries, 10)
    assert [[h.id for h in q] for q in hits] == exact_ids(live, queries, 10)
    assert index.get(512).key == "a12"
    with pytest.raises(KeyError):
        index.get(3)
    with pytest.raises(KeyError):
        index.vectors([510])
    assert index.rows([0, 3, 545]).keys() == {0, 545}

    index.close()  # replayed from the journal: the same answers
    index = SearchIndex.load(tmp_path / "index")
    assert [[h.id for h in q] for q in index.search(queries, 10)] == exact_ids(live, queries, 10)
    index.compact()  # folded into a snapshot: the same answers, ids kept, journal empty
    assert index.describe()["journal_bytes"] == 0 and index.describe()["deleted_pending"] == 0
    assert [[h.id for h in q] for q in index.search(queries, 10)] == exact_ids(live, queries, 10)
    assert index.get(545).key == "b5" and index.get(0).caption == "caption k0"
    index.close()
    index = SearchIndex.load(tmp_path / "index")
    assert index.count == 557 and index.add(unit(rng, 1), rows("c", 1)) == [560]
    index.close()


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_ann_adds_into_the_index_and_deletes_by_type(tmp_path: Path, kind: str):
    """IVF: adds land in the trained lists and deletes leave them. HNSW: adds join the graph,
    deletes are tombstones never returned, and a compaction drops them from the graph."""
    rng = np.random.default_rng(1)
    index = build(tmp_path / "index", unit(rng, 3000), kind)
    faiss_index = index._searcher.index
    added = unit(rng, 100)
    ids = index.add(added, rows("a", 100))
    assert faiss_index.ntotal == 3100
    hits = index.search(added[:20], 1)
    assert [h[0].id for h in hits] == ids[:20]  # each new vector finds itself
    doomed = list(range(0, 3000, 10))  # 300
    index.delete(doomed)
    assert faiss_index.ntotal == (3100 if kind == "hnsw" else 2800)
    queries = unit(rng, 50)
    found = {h.id for q in index.search(queries, 10) for h in q}
    assert not found & set(doomed)
    assert all(len(q) == 10 for q in index.search(queries, 10))
    index.compact()
    assert index._searcher.index.ntotal == 2800 == index.count
    assert not {h.id for q in index.search(queries, 10) for h in q} & set(doomed)
    index.close()


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_recall_after_updates_is_within_a_point_of_a_fresh_build(tmp_path: Path, kind: str):
    """+10% adds and -5% deletes on a built index; its recall@10 (written to the manifest at
    compaction as recall_at_10_before_compaction) against a fresh build of the same items."""
    rng = np.random.default_rng(2)
    centers = unit(rng, 20, 32)
    x = centers[rng.integers(0, 20, 22_000)] + rng.standard_normal((22_000, 32)) / np.sqrt(32)
    vectors = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    base, extra = vectors[:20_000], vectors[20_000:]
    write_index(tmp_path / "updated", base, rows("k", 20_000), spec=spec(kind))
    index = SearchIndex.load(tmp_path / "updated")
    index.add(extra, rows("a", 2000))
    index.delete(rng.choice(22_000, 1100, replace=False).tolist())
    index.compact()
    updated = index.manifest["recall_at_10_before_compaction"]
    live = index.vectors(sorted(index.rows(range(22_000))))  # the live items, in id order
    fresh = write_index(tmp_path / "fresh", live, rows("f", len(live)), spec=spec(kind))
    fresh_recall = SearchIndex.load(fresh).manifest["recall_at_10"]
    assert updated is not None and updated >= fresh_recall - 0.01, (updated, fresh_recall)
    assert index.manifest["recall_at_10"] >= fresh_recall - 0.01
    index.close()


def test_a_torn_journal_tail_is_ignored_and_cut_off(tmp_path: Path):
    rng = np.random.default_rng(3)
    index = build(tmp_path / "index", unit(rng, 50))
    index.add(unit(rng, 2), rows("a", 2))
    index.delete([1])
    index.close()
    journal = tmp_path / "index" / JOURNAL_FILE
    whole = journal.read_bytes()
    journal.write_bytes(whole + whole[:30])  # a third record cut short by a crash
    index = SearchIndex.load(tmp_path / "index")
    assert index.count == 51 and journal.stat().st_size == len(whole)
    index.add(unit(rng, 1), rows("b", 1))  # appended after the cut, readable after
    index.close()
    records, valid = read_records(journal)
    assert [r.op for _, r in records] == [
        "add",
        "delete",
        "add",
    ] and valid == journal.stat().st_size
    flipped = bytearray(journal.read_bytes())
    flipped[-5] ^= 0xFF  # a bit flip in the last record: its CRC no longer matches
    journal.write_bytes(bytes(flipped))
    assert len(read_records(journal)[0]) == 2


def test_a_second_process_serves_the_index_read_only(tmp_path: Path):
    rng = np.random.default_rng(4)
    index = build(tmp_path / "index", unit(rng, 20))
    assert index.writable
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from serve.indexing.index import SearchIndex\n"
            "i = SearchIndex.load(sys.argv[1]); print(i.writable, i.count, i.read_only_reason)",
            str(tmp_path / "index"),
        ],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith("False 20 the index is written by process")
    with pytest.raises(IndexReadOnlyError):
        SearchIndex.load(tmp_path / "index", writable=False).add(unit(rng, 1), rows("x", 1))
    index.close()


def test_a_full_disk_refuses_the_update_and_changes_nothing(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        rng = np.random.default_rng(5)
        index = build(mount / "index", unit(rng, 100))
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last block
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        os.truncate(filler, filler.stat().st_size - 16384)  # room for part of a record only
        before = index.search(unit(np.random.default_rng(9), 1), 5)
        with pytest.raises(JournalWriteError, match="not saved"):
            index.add(unit(rng, 2000), rows("a", 2000))  # 128 KB of vectors
        assert index.count == 100 and index.describe()["journal_bytes"] == 0
        assert (mount / "index" / JOURNAL_FILE).stat().st_size == 0
        assert index.search(unit(np.random.default_rng(9), 1), 5) == before
        filler.unlink()
        assert index.add(unit(rng, 2), rows("a", 2)) == [100, 101]  # room again: it works
        index.close()
        assert SearchIndex.load(mount / "index").count == 102
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_searches_see_each_update_whole_while_updates_and_compactions_run(tmp_path: Path):
    """Each add is 4 copies of one new direction; a search for it finds 0 or 4, never 1-3, and
    no search fails, while another thread adds, deletes and compacts."""
    rng = np.random.default_rng(6)
    index = build(tmp_path / "index", unit(rng, 2000), "hnsw")
    directions = unit(rng, 40)
    errors: list[BaseException] = []
    partial: list[int] = []
    done = threading.Event()

    def search_loop() -> None:
        while not done.is_set():
            try:
                for d in directions:
                    hits = index.search(d[None, :], 8)[0]
                    same = sum(h.score > 0.999 for h in hits)
                    if same not in (0, 4):
                        partial.append(same)
            except BaseException as exc:  # noqa: BLE001  # any failure is the finding
                errors.append(exc)
                return

    readers = [threading.Thread(target=search_loop) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for n, d in enumerate(directions):
            ids = index.add(np.repeat(d[None, :], 4, axis=0), rows(f"d{n}-", 4))
            if n % 3 == 0:
                index.delete(ids)
            if n % 15 == 7:
                index.compact()
    finally:
        done.set()
        for reader in readers:
            reader.join()
    assert not errors and not partial
    assert index.count == 2000 + 4 * sum(n % 3 != 0 for n in range(40))
    index.close()


def test_a_reload_hands_writes_over_to_the_new_version(tmp_path: Path):
    from serve.registry import IndexRegistry

    rng = np.random.default_rng(7)
    build(tmp_path / "index", unit(rng, 30)).close()
    registry = IndexRegistry({"a": tmp_path / "index"}, lambda p: SearchIndex.load(p))
    with registry.lease("a") as old:
        registry.reload("a")
        assert old.add(unit(rng, 1), rows("x", 1)) == [30]  # a write that waited: not lost
    with registry.lease("a") as current:
        assert current is not old and current.count == 31 and current.writable
    registry.close()
