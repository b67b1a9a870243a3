"""Benchmark the index types on clustered unit vectors: build, memory, q/s, recall.

    python bench/index.py [--count 1000000] [--dim 128 | --model ARTIFACT_OR_NAME]
                          [--types flat,hnsw,ivfpq] [--ef-search N] [--nprobe N] [--rerank-factor N]

The vectors are a Gaussian mixture on the unit sphere: count/1000 centers drawn uniformly on the
sphere, each vector a center plus isotropic noise of the center's norm, normalised (cosine to its
center ~0.7, to a random vector ~0). Queries are fresh draws from the same mixture. D = 128 is
duet-tiny's embed_dim; `--model` takes D from a model artifact or an open_clip name (ViT-B-32: 512).
Each type is built with the defaults `auto` would derive for `count` (knobs given on the command
line override them), then searched through `VectorSearcher`, the code the service runs: top 10,
batched (all queries at once, after one untimed warm-up pass) and one query at a time. Recall@10 is
against exact search on the same queries. Memory is what a loaded index holds: the FAISS index
(serialised size) and the float32 vectors that exact search and the re-rank read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from serve.indexing.vector_search import (  # noqa: E402
    IndexSpec,
    VectorSearcher,
    build_faiss_index,
    plan_index,
)

K = 10
CHUNK = 100_000  # vectors generated at a time, to bound temporary memory


def clustered_unit_vectors(rng: np.random.Generator, centers: np.ndarray, count: int) -> np.ndarray:
    """`count` draws [count, D] of the mixture: a random center + N(0, 1/D) noise, normalised."""
    dim = centers.shape[1]
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        x = centers[rng.integers(0, len(centers), n)]
        x += rng.standard_normal((n, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        out[start : start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _queries_per_second(searcher: VectorSearcher, queries: np.ndarray, single: int) -> tuple:
    """(ids [Q, K] of the batched search, batched q/s, one-at-a-time q/s over `single` queries).

    One untimed batched pass first, so that every type is timed with its pages in memory.
    """
    searcher.search(queries, K)
    start = time.perf_counter()
    _, ids = searcher.search(queries, K)
    batched = len(queries) / (time.perf_counter() - start)
    start = time.perf_counter()
    for q in range(single):
        searcher.search(queries[q : q + 1], K)
    return ids, batched, single / (time.perf_counter() - start)


def embed_dim(model: str) -> int:
    """The embedding width of a model artifact directory or an open_clip model name."""
    if Path(model).is_dir():
        from common.artifact import read_manifest

        return int(read_manifest(model)["embed_dim"])
    from common.model import model_config

    return int(model_config(model)["embed_dim"])


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth, strict=True)]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--model", help="artifact directory or open_clip name: D = its embed_dim")
    parser.add_argument("--queries", type=int, default=1000, help="batched queries")
    parser.add_argument("--single", type=int, default=200, help="one-at-a-time queries")
    parser.add_argument("--types", default="flat,hnsw,ivfpq")
    parser.add_argument("--ef-search", type=int)
    parser.add_argument("--nprobe", type=int)
    parser.add_argument("--rerank-factor", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model:
        args.dim = embed_dim(args.model)

    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((max(1, args.count // 1000), args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    start = time.perf_counter()
    vectors = clustered_unit_vectors(rng, centers, args.count)
    queries = clustered_unit_vectors(rng, centers, args.queries)
    print(
        f"{args.count:,} x {args.dim} clustered unit vectors ({len(centers)} clusters, generated "
        f"in {time.perf_counter() - start:.0f} s); {args.queries} batched + {args.single} single "
        f"queries, top {K}; FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads\n"
    )
    exact = VectorSearcher(vectors, None)
    truth, exact_batched, exact_single = _queries_per_second(exact, queries, args.single)
    print(
        "| type | FAISS index | search params | build s | memory: index + vectors MB "
        "| batched q/s | single q/s | vs exact (batched / single) | recall@10 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for index_type in args.types.split(","):
        spec = IndexSpec(
            index_type=index_type,
            ef_search=args.ef_search,
            nprobe=args.nprobe,
            rerank_factor=args.rerank_factor,
        )
        plan = plan_index(spec, args.count, args.dim)
        start = time.perf_counter()
        index = build_faiss_index(plan, vectors)
        build_seconds = time.perf_counter() - start
        searcher = VectorSearcher(
            vectors, index, search_params=plan.search_params, rerank_factor=plan.rerank_factor
        )
        if index is None:  # flat: the exact baseline measured above
            ids, batched, single = truth, exact_batched, exact_single
        else:
            ids, batched, single = _queries_per_second(searcher, queries, args.single)
        index_mb = 0.0 if index is None else faiss.serialize_index(index).nbytes / 1e6
        params = ", ".join(f"{k}={v}" for k, v in plan.search_params.items())
        if plan.rerank_factor > 1:
            params += f", rerank x{plan.rerank_factor}"
        print(
            f"| {index_type} | {plan.factory or 'none (exact)'} | {params or '-'} "
            f"| {build_seconds:.1f} | {index_mb:,.0f} + {vectors.nbytes / 1e6:,.0f} "
            f"| {batched:,.0f} | {single:,.0f} "
            f"| {batched / exact_batched:.1f}x / {single / exact_single:.1f}x "
            f"| {_recall(ids, truth):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
