"""Benchmark filtered search: recall@10 against exact filtered search, latency against unfiltered.

    python bench/filters.py [--count 1000000] [--dim 128] [--types flat,hnsw,ivfpq]
                            [--selectivities 0.5,0.1,0.01] [--single 200]

Vectors and queries are bench/index.py's clustered unit vectors; each row gets a metadata field
`bucket` drawn uniformly from 0..9999, independent of its vector, and a filter of selectivity s is
`{"bucket": {"lt": 10000 s}}`. Each type is built with the defaults `auto` derives for `count`,
then searched one query at a time through `VectorSearcher` with `allowed` = the filter's mask
from `AttributeColumns`, read-only as `SearchIndex` caches it: a filter's mask is computed once
per filter and index version (its time is the "mask ms" column) and the searches after it reuse
it and what the search derived from it (bitmap, allowed rows, their gathered vectors): "first ms"
is the first search with a new mask, which derives them. Recall@10 is against exact search among
the allowed rows; p50 / p99 in ms over `single` queries, after a warm-up pass of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from bench.index import clustered_unit_vectors  # noqa: E402
from serve.indexing.filtered_search import exact_allowed  # noqa: E402
from serve.indexing.filters import AttributeColumns, parse_filter  # noqa: E402
from serve.indexing.vector_search import (  # noqa: E402
    IndexSpec,
    VectorSearcher,
    build_faiss_index,
    plan_index,
)

K = 10
BUCKETS = 10_000


def _timed(searcher: VectorSearcher, queries: np.ndarray, allowed: np.ndarray | None) -> tuple:
    """(ids [Q, K], latencies in ms [Q]) of one-at-a-time searches among `allowed` rows."""
    ids = np.empty((len(queries), K), np.int64)
    times = np.empty(len(queries))
    for q in range(len(queries)):
        start = time.perf_counter()
        _, found = searcher.search(queries[q : q + 1], K, allowed=allowed)
        times[q] = (time.perf_counter() - start) * 1000
        ids[q] = found[0]
    return ids, times


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found & truth| / |truth| (|truth| < K when few rows match)."""
    hits = [
        len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, int((b >= 0).sum()))
        for a, b in zip(ids, truth, strict=True)
    ]
    return float(np.mean(hits))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--types", default="flat,hnsw,ivfpq")
    parser.add_argument("--selectivities", default="0.5,0.1,0.01")
    parser.add_argument("--single", type=int, default=200, help="one-at-a-time queries")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((max(1, args.count // 1000), args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vectors = clustered_unit_vectors(rng, centers, args.count)
    queries = clustered_unit_vectors(rng, centers, args.single)
    buckets = rng.integers(0, BUCKETS, args.count)
    start = time.perf_counter()
    columns = AttributeColumns.from_metas([{"bucket": int(b)} for b in buckets])
    print(
        f"{args.count:,} x {args.dim} clustered unit vectors, {args.single} single queries, "
        f"top {K}; attribute columns built in {time.perf_counter() - start:.1f} s; "
        f"FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads\n"
    )
    selectivities = [float(s) for s in args.selectivities.split(",")]
    filters = {s: parse_filter({"bucket": {"lt": round(BUCKETS * s)}}, max_conditions=8,
                                max_values=8) for s in selectivities}  # fmt: skip
    truths, masks, mask_ms = {}, {}, {}
    for s, where in filters.items():
        start = time.perf_counter()
        masks[s] = columns.mask(where)
        mask_ms[s] = (time.perf_counter() - start) * 1000
        masks[s].flags.writeable = False
        truths[s] = exact_allowed(vectors, queries, K, masks[s].copy())[1]
    print(
        "| type | search params | selectivity | allowed rows | mask ms | first ms | recall@10 vs "
        "exact filtered | p50 ms | p99 ms | unfiltered p50 / p99 ms | p50 vs unfiltered |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for index_type in args.types.split(","):
        plan = plan_index(IndexSpec(index_type=index_type), args.count, args.dim)
        start = time.perf_counter()
        index = build_faiss_index(plan, vectors)
        build_s = time.perf_counter() - start
        searcher = VectorSearcher(
            vectors, index, search_params=plan.search_params, rerank_factor=plan.rerank_factor
        )
        _timed(searcher, queries[:20], None)  # warm-up
        _, base = _timed(searcher, queries, None)
        params = ", ".join(f"{k}={v}" for k, v in plan.search_params.items()) or "exact"
        params += f" (built in {build_s:.0f} s)"
        for s in filters:
            fresh = masks[s].copy()  # a new mask object: nothing derived from it yet
            fresh.flags.writeable = False
            _, first = _timed(searcher, queries[:1], fresh)
            del fresh
            _timed(searcher, queries[:20], masks[s])
            ids, times = _timed(searcher, queries, masks[s])
            p50, p99 = np.percentile(times, [50, 99])
            b50, b99 = np.percentile(base, [50, 99])
            print(
                f"| {index_type} | {params} | {s:.0%} | {int(masks[s].sum()):,} "
                f"| {mask_ms[s]:.2f} | {first[0]:.2f} "
                f"| {_recall(ids, truths[s]):.3f} | {p50:.2f} | {p99:.2f} "
                f"| {b50:.2f} / {b99:.2f} | {p50 / b50:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
