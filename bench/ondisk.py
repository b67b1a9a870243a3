"""Benchmark the on-disk IVF-PQ tier: build time, disk size, serving memory, recall@10, p50.

    python bench/ondisk.py [--count 1000000] [--dim 512] [--out /tmp/duet-ondisk] [--keep]
                           [--pq-m M]                     # lists of M bytes per vector
    python bench/ondisk.py --probe-only --out /tmp/duet-ondisk   # serve a kept index again
    python bench/ondisk.py --probe-only --memory-limit-mb 1200 ...  # ... within 1.2 GB (root)
    python bench/ondisk.py --probe-only --updates 100000 --count N ...  # ... after updates
    python bench/ondisk.py --probe-only --updates 100000 --compact ...  # ... then compacted

The vectors are bench/index.py's clustered unit vectors, generated into a memory-mapped .npy
(as a build's staging merge leaves them) and written with `write_index` and the on-disk plan
`auto` derives for the count (`on_disk=True`), so no step holds them all. The index is then
loaded in a fresh process the way the service loads it (`SearchIndex.load`, no model) and
searched one query at a time through `SearchIndex.search` (re-rank and metadata included).
Memory: the process's anonymous resident memory (RssAnon: not backed by a file) after load +
searches, less before the load, and its whole RSS (mapped index pages included, which the
kernel may drop). Recall@10: fresh queries of the same mixture against exact search.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.index import clustered_unit_vectors  # noqa: E402
from serve.indexing.index import IndexRow, write_index  # noqa: E402
from serve.indexing.vector_search import IndexSpec  # noqa: E402

CHUNK = 100_000

PROBE = """
import json, sys, time, numpy as np
from serve.indexing.delta import AppendedRows
from serve.indexing.filtered_search import exact_allowed
from serve.indexing.index import IndexRow, SearchIndex
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
queries = np.load(sys.argv[2])
added = np.load(sys.argv[3]) if len(sys.argv) > 3 else None
compact = sys.argv[4:] == ["compact"]
before = status("RssAnon:")
index = SearchIndex.load(sys.argv[1], writable=added is not None)
figures = {}
if added is not None:  # updates first: adds (journalled, fsynced) and deletes, then the searches
    start = time.perf_counter()
    for i in range(0, len(added), 256):
        rows = [IndexRow(f"new{i + j}", f"new {i + j}", {}) for j in range(len(added[i:i + 256]))]
        index.add(added[i:i + 256], rows)
    figures["adds_per_s"] = len(added) / (time.perf_counter() - start)
    step = index.count // (len(added) // 2)
    start = time.perf_counter()
    for i in range(0, len(added) // 2, 256):
        index.delete(list(range(i * step, min(len(added) // 2, i + 256) * step, step)))
    figures["deletes_per_s"] = (len(added) // 2) / (time.perf_counter() - start)
    figures["live_items"] = index.count
if compact:  # a new snapshot of the live rows (the build's add phase again), served from then on
    start = time.perf_counter()
    index.compact()
    figures["compact_s"] = time.perf_counter() - start
index.search(queries[:10], 10)  # warm-up
times = []
found = []
for q in queries:
    start = time.perf_counter()
    hits = index.search(q[None], 10)[0]
    times.append(time.perf_counter() - start)
    found.append([h.id for h in hits])
after_anon, after_rss = status("RssAnon:"), status("VmRSS:")
items = index._items
alive = items.alive_mask()
alive = np.ones(items.rows, dtype=bool) if alive is None else alive
# the truth from a second map of the file, read ahead: the index's own is marked for random reads
stored = index._searcher.vectors
scan = np.load(sys.argv[1] + "/vectors.npy", mmap_mode="r")
stored = AppendedRows(scan, stored.added) if isinstance(stored, AppendedRows) else scan
_, rows = exact_allowed(stored, queries, 10, alive)
truth = items.ids[rows]
recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth.tolist(), found)])
ms = 1000 * np.array(times)
print(json.dumps({"anon_mb_beyond_imports": after_anon - before, "rss_mb": after_rss,
                  "p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
                  "recall_at_10": float(recall), "queries": len(queries), **figures}))
"""


def _centers(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    centers = rng.standard_normal((max(1, count // 1000), dim)).astype(np.float32)
    return centers / np.linalg.norm(centers, axis=1, keepdims=True)


def _vectors(path: Path, count: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(memory-mapped stored vectors [count, dim], fresh queries [500, dim])."""
    rng = np.random.default_rng(seed)
    centers = _centers(rng, count, dim)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        out[start : start + n] = clustered_unit_vectors(rng, centers, n)
    out.flush()
    del out
    return np.load(path, mmap_mode="r"), clustered_unit_vectors(rng, centers, 500)


class _Rows:
    """`count` metadata rows made as they are read: a list of 10M rows would be gigabytes."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[IndexRow]:
        return (IndexRow(f"k{i}", f"item {i}", {}) for i in range(self.count))


def _probe(
    index_dir: Path,
    queries: Path,
    limit_mb: int | None = None,
    added: Path | None = None,
    compact: bool = False,
) -> dict[str, float]:
    """The served figures of `index_dir`, from a fresh process (see PROBE); `limit_mb`: in a
    memory cgroup of that limit, the index's files evicted from the page cache first. `added`:
    vectors to add (and half as many rows to delete) first; the journal is removed afterwards,
    so the index is its snapshot again, unless `compact`: a compaction after the updates makes
    them the new snapshot (the index on disk changes)."""
    command = [sys.executable, "-c", PROBE, str(index_dir), str(queries)]
    command += [] if added is None else [str(added)]
    command += ["compact"] if compact else []
    cgroup = None if limit_mb is None else _memory_cgroup(limit_mb)
    if cgroup is not None:
        _evict(index_dir)  # pages cached by the build are charged to it, not to the probe
        join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        command = ["sh", "-c", join, str(cgroup), *command]
    try:
        probe = subprocess.run(
            command, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
        )
        served = json.loads(probe.stdout.strip().splitlines()[-1])
        if cgroup is not None:
            served["cgroup_limit_mb"] = limit_mb
            served["cgroup_peak_mb"] = _cgroup_peak_mb(cgroup)
        return served
    finally:
        if cgroup is not None:
            cgroup.rmdir()
        if added is not None:
            (index_dir / "journal.log").unlink(missing_ok=True)


def _memory_cgroup(limit_mb: int) -> Path:
    """A new memory cgroup (v2 or v1) capped at `limit_mb`: page cache counts towards it, so
    mapped index pages beyond it are dropped and read again, as on a machine that small."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()
    root = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
    cgroup = root / f"duet-ondisk-{os.getpid()}"
    cgroup.mkdir()
    limit_file = "memory.max" if v2 else "memory.limit_in_bytes"
    (cgroup / limit_file).write_text(str(limit_mb << 20))
    if v2:
        (cgroup / "memory.swap.max").write_text("0")
    return cgroup


def _cgroup_peak_mb(cgroup: Path) -> float:
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        if (cgroup / name).is_file():
            return int((cgroup / name).read_text()) / 2**20
    return float("nan")


def _evict(directory: Path) -> None:
    """Drop the clean cached pages of every file in `directory` (POSIX_FADV_DONTNEED)."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("/tmp/duet-ondisk"))
    parser.add_argument("--keep", action="store_true", help="keep the index afterwards")
    parser.add_argument(
        "--pq-m",
        type=int,
        help="sub-quantisers of the lists' codes (8 bits each; must divide --dim): fewer make "
        "smaller lists, re-ranked from more candidates (default: the build's, D / 4)",
    )
    parser.add_argument(
        "--probe-only", action="store_true", help="serve the index kept in --out again, no build"
    )
    parser.add_argument(
        "--memory-limit-mb",
        type=int,
        help="with --probe-only: serve it in a memory cgroup of this size (root), page cache too",
    )
    parser.add_argument(
        "--updates",
        type=int,
        default=0,
        help="with --probe-only (and the build's --count, --dim): add this many items and delete "
        "half as many before the searches; the journal is removed afterwards",
    )
    parser.add_argument(
        "--compact",
        action="store_true",
        help="with --updates: compact after them (timed; the searches then run on the new "
        "snapshot, which replaces the kept index)",
    )
    args = parser.parse_args(argv)
    if args.compact and not (args.probe_only and args.updates):
        parser.error("--compact goes with --probe-only --updates N")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.probe_only:
        added = None
        if args.updates:  # new rows of the same mixture (the build's centers: seed 0)
            centers = _centers(np.random.default_rng(0), args.count, args.dim)
            added = args.out / "added.npy"
            np.save(added, clustered_unit_vectors(np.random.default_rng(1), centers, args.updates))
        served = _probe(
            args.out / "index", args.out / "queries.npy", args.memory_limit_mb, added, args.compact
        )
        print(json.dumps(served))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    vectors, queries = _vectors(args.out / "source.npy", args.count, args.dim, 0)
    np.save(args.out / "queries.npy", queries)
    print(f"generated {args.count} x {args.dim} in {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    index_dir = write_index(
        args.out / "index",
        vectors,
        _Rows(args.count),
        spec=IndexSpec(on_disk=True, recall_queries=1000, pq_m=args.pq_m),
    )
    build_s = time.perf_counter() - start
    del vectors
    manifest = json.loads((index_dir / "index.json").read_text())
    disk = {p.name: p.stat().st_size for p in index_dir.iterdir()}
    served = _probe(index_dir, args.out / "queries.npy")
    print(f"{args.count} x {args.dim}: {manifest['factory']}, {manifest['search_params']}")
    print(f"build {build_s:.0f} s (index part {manifest['index_build_seconds']:.0f} s)")
    print("disk MB: " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(disk.items())))
    print(f"recall@10 (stored vectors as queries, manifest): {manifest['recall_at_10']}")
    print(json.dumps(served))
    if not args.keep:
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
