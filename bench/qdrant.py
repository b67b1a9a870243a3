"""Benchmark Qdrant (embedded, in this process) against FAISS: top-10 agreement and latency.

    python bench/qdrant.py [--count 100000] [--dim 512] [--data clustered,random]
                           [--queries 200] [--filtered-queries 20] [--selectivity 0.1]

For each kind of data, `count` unit vectors (bench/index.py's clustered mixture, or uniform on
the sphere) with a metadata field `bucket` drawn from 0..9999 are written as a flat (exact) FAISS
index, then exported with `serve.indexing.to_qdrant` into an embedded Qdrant store held in
memory. Both are searched one query at a time through the classes the service runs
(`SearchIndex`, `QdrantIndex`: payloads included), unfiltered and with `{"bucket": {"lt": 10000
s}}`; agreement is the share of FAISS's exact top 10 that Qdrant returns too.

Embedded Qdrant is qdrant-client's local mode: exact search in numpy and payload filters tested
in Python point by point. It is how the tests run Qdrant offline; its latency is not a Qdrant
server's (Rust, HNSW, payload indexes) and says nothing about one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdrant_client import QdrantClient  # noqa: E402

from bench.index import clustered_unit_vectors  # noqa: E402
from serve.indexing.index import IndexRow, SearchIndex, write_index  # noqa: E402
from serve.indexing.qdrant_collection import MEMORY, QdrantConfig, QdrantConnection  # noqa: E402
from serve.indexing.qdrant_store import QdrantIndex  # noqa: E402
from serve.indexing.to_qdrant import export_index  # noqa: E402
from serve.indexing.vector_search import IndexSpec  # noqa: E402

K = 10
BUCKETS = 10_000


def unit_vectors(kind: str, rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    if kind == "clustered":
        centers = rng.standard_normal((max(1, count // 1000), dim)).astype(np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        return clustered_unit_vectors(rng, centers, count)
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def timed_search(index: Any, queries: np.ndarray, where: Any) -> tuple[list[set[int]], float]:
    """Per query the ids found, and the p50 latency in ms (one query at a time)."""
    found, times = [], []
    index.search(queries[:1], K, where=where)  # warm-up
    for q in range(len(queries)):
        start = time.perf_counter()
        (hits,) = index.search(queries[q : q + 1], K, where=where)
        times.append((time.perf_counter() - start) * 1000)
        found.append({hit.id for hit in hits})
    return found, float(np.median(times))


def agreement(found: list[set[int]], truth: list[set[int]]) -> float:
    return float(np.mean([len(a & b) / max(1, len(b)) for a, b in zip(found, truth, strict=True)]))


def run(kind: str, args: argparse.Namespace, root: Path) -> list[str]:
    rng = np.random.default_rng(args.seed)
    vectors = unit_vectors(kind, rng, args.count + args.queries, args.dim)
    queries, vectors = vectors[: args.queries], vectors[args.queries :]
    buckets = rng.integers(0, BUCKETS, len(vectors))
    rows = [IndexRow(f"k{i}", f"item {i}", {"bucket": int(b)}) for i, b in enumerate(buckets)]
    spec = IndexSpec(index_type="flat")
    index_dir = write_index(root / kind, vectors, rows, spec=spec)
    client = QdrantClient(location=MEMORY)
    start = time.perf_counter()
    export_index(index_dir, kind, client, batch_rows=1024)
    export_s = time.perf_counter() - start
    faiss_index = SearchIndex.load(index_dir, writable=False)
    connection = QdrantConnection(QdrantConfig(path=Path(MEMORY)), client)
    qdrant = QdrantIndex(connection, kind, expected_dim=args.dim, writable=False)
    raw = {"bucket": {"lt": int(BUCKETS * args.selectivity)}}
    lines = []
    for label, n, raw_filter in (
        ("none", args.queries, None),
        (f"{args.selectivity:.0%}", args.filtered_queries, raw),
    ):
        limits = {"max_conditions": 4, "max_values": 4}
        faiss_where = None if raw_filter is None else faiss_index.filter(raw_filter, **limits)
        qdrant_where = None if raw_filter is None else qdrant.filter(raw_filter, **limits)
        truth, faiss_ms = timed_search(faiss_index, queries[:n], faiss_where)
        found, qdrant_ms = timed_search(qdrant, queries[:n], qdrant_where)
        lines.append(
            f"| {kind} | {label} | {n} | {agreement(found, truth):.4f} | {faiss_ms:.2f} | "
            f"{qdrant_ms:.2f} | {export_s:.0f} |"
        )
        print(lines[-1], flush=True)
    qdrant.close()
    faiss_index.close()
    client.close()
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--data", default="clustered,random")
    parser.add_argument("--queries", type=int, default=200, help="unfiltered queries")
    parser.add_argument("--filtered-queries", type=int, default=20)
    parser.add_argument("--selectivity", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{args.count} x {args.dim}, top {K}; Qdrant embedded (in memory), not a server")
    print("| data | filter | queries | agreement@10 | FAISS flat p50 ms | Qdrant emb. p50 ms "
          "| export s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    root = Path(tempfile.mkdtemp(prefix="duet-bench-qdrant-"))
    try:
        for kind in args.data.split(","):
            run(kind, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
