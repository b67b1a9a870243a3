"""Updates to a served index: adds per second, and searches while items are added and deleted.

    python bench/updates.py [--model duet-tiny] [--vectors 100000] [--index-type hnsw]
                            [--duration-s 5] [--rounds 2] [--clients 4]
    python bench/updates.py --recall [--vectors 100000]

Builds a random-init artifact of `--model` (random weights cost what trained ones do) and an
index of `--vectors` random unit vectors (bench/serve_load.py's `build`), then:

1. In process, no HTTP (embedding excluded): `SearchIndex.add` of 1 and of 64 items at a time
   back to back on a copy of the index, each add journalled and fsynced before it returns.
2. `python -m serve` on a loopback port; one client adds back to back for `--duration-s` per row:
   by embedding (1 and 64 items a request: embedding excluded) and by 64 x 64 JPEG (1 and 16 a
   request: decoded, encoded by the model, thumbnail made: embedding included). Items per s.
3. Searches (POST /search by text: encode + search, `--clients` connections) idle, and while one
   more client adds 8 items by embedding and deletes 4 of them, back to back or at
   `--adds-per-s` items added per second (`--skip-rates`: this part only); idle and busy rows
   alternate in every round and rounds are pooled. p50 / p99 and errors of the searches, and the
   updates made meanwhile.

`--recall` instead: for HNSW and IVF-PQ, an index of `--vectors` clustered unit vectors (D = 128,
bench/index.py's mixture) gets +10% adds and -5% deletes; its recall@10 as updated (measured by
the compaction that follows: `recall_at_10_before_compaction`) and after compaction, against a
fresh build of the same live items. Target: updated within 1 point of fresh.

Targets (docs/benchmarks.md): 0 errors; an added item searchable when its add is answered (the
tests check it: tests/unit/test_items_api.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Run as a script from anywhere: make the repository root importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.index import clustered_unit_vectors  # noqa: E402
from bench.serve_load import (  # noqa: E402  # the service benchmark's client and server
    HOST,
    Connection,
    Result,
    build,
    drive,
    json_request,
    queries,
    start_server,
)
from serve.indexing.index import IndexRow, SearchIndex, write_index  # noqa: E402
from serve.indexing.vector_search import IndexSpec  # noqa: E402


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def in_process_adds(index_dir: Path, root: Path, duration_s: float) -> dict[int, float]:
    """Items added per second by `SearchIndex.add`, by batch size, on a copy of the index."""
    copy = root / "index-copy"
    shutil.copytree(index_dir, copy)
    index = SearchIndex.load(copy)
    rates = {}
    try:
        for batch in (1, 64):
            vectors = unit_vectors(4096, index.dim, seed=batch)
            rows = [IndexRow(f"b{batch}-{i}", "", {}) for i in range(batch)]
            added, start = 0, time.perf_counter()
            while time.perf_counter() - start < duration_s:
                index.add(vectors[added % 4096 : added % 4096 + batch][:batch], rows)
                added += batch
            rates[batch] = added / (time.perf_counter() - start)
    finally:
        index.close()
        shutil.rmtree(copy, ignore_errors=True)
    return rates


def jpeg_base64(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def add_request(port: int, dim: int, batch: int, kind: str, seed: int) -> bytes:
    if kind == "embedding":
        items = [{"embedding": v.tolist()} for v in unit_vectors(batch, dim, seed)]
    else:
        items = [{"image": jpeg_base64(seed * 100 + i)} for i in range(batch)]
    return json_request(HOST, port, "/indices/default/items", {"items": items})


async def adds_per_second(port: int, requests: list[bytes], batch: int, duration_s: float) -> float:
    """One client posting the prepared adds back to back; items added per second."""
    connection = await Connection.open(HOST, port)
    added, n, start = 0, 0, time.perf_counter()
    try:
        while time.perf_counter() - start < duration_s:
            status, body = await connection.request(requests[n % len(requests)])
            if status != 200:
                raise RuntimeError(f"add answered {status}: {body[:200]!r}")
            added += batch
            n += 1
    finally:
        connection.close()
    return added / (time.perf_counter() - start)


async def churn(
    port: int, dim: int, stop: asyncio.Event, adds_per_s: float
) -> tuple[int, int, int]:
    """Add 8 items by embedding, delete 4 of them, until `stop`, at most `adds_per_s` items
    added per second (0: back to back); (added, deleted, errors)."""
    connection = await Connection.open(HOST, port)
    added = deleted = errors = 0
    seed = 10_000
    start = time.perf_counter()
    try:
        while not stop.is_set():
            if adds_per_s:  # paced: the next 8 when the rate allows them
                await asyncio.sleep(max(0.0, start + added / adds_per_s - time.perf_counter()))
            seed += 1
            status, body = await connection.request(add_request(port, dim, 8, "embedding", seed))
            if status != 200:
                errors += 1
                continue
            added += 8
            ids = json.loads(body)["ids"][:4]
            request = json_request(HOST, port, "/indices/default/items/delete", {"ids": ids})
            status, _ = await connection.request(request)
            errors += status != 200
            deleted += 4 * (status == 200)
    finally:
        connection.close()
    return added, deleted, errors


async def searches(
    port: int, clients: int, duration_s: float, busy: bool, dim: int, adds_per_s: float
):
    texts = queries(400, seed=3)
    stop = asyncio.Event()
    writer = asyncio.create_task(churn(port, dim, stop, adds_per_s)) if busy else None
    try:
        result = await drive(HOST, port, clients, duration_s, texts)
    finally:
        stop.set()
    updates = await writer if writer is not None else (0, 0, 0)
    return result, updates


def updated_recall(root: Path, count: int) -> None:
    """Recall@10 after +10% adds and -5% deletes vs a fresh build, for HNSW and IVF-PQ."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((max(1, count // 1000), 128)).astype(np.float32)  # as index.py
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vectors = clustered_unit_vectors(rng, centers, count + count // 10)
    print(f"# recall@10 after +10% adds, -5% deletes on {count} vectors (D = 128)")
    print("| type | updated | after compaction | fresh build | compaction s |")
    print("|---|---|---|---|---|")
    for kind in ("hnsw", "ivfpq"):
        out = root / f"{kind}-updated"
        write_index(out, vectors[:count], [("", "", {})] * count, spec=IndexSpec(index_type=kind))
        index = SearchIndex.load(out)
        for start in range(count, len(vectors), 1000):  # adds of 1,000, as a stream would come
            batch = vectors[start : start + 1000]
            index.add(batch, [IndexRow("", "", {})] * len(batch))
        doomed = rng.choice(len(vectors), len(vectors) // 20, replace=False)
        index.delete(doomed.tolist())
        start = time.perf_counter()
        index.compact()
        seconds = time.perf_counter() - start
        manifest = index.manifest
        live = np.delete(vectors, doomed, axis=0)
        index.close()
        fresh_dir = root / f"{kind}-fresh"
        spec = IndexSpec(index_type=kind)
        write_index(fresh_dir, live, [("", "", {})] * len(live), spec=spec)
        fresh = SearchIndex.load(fresh_dir, writable=False).manifest["recall_at_10"]
        print(
            f"| {kind} | {manifest['recall_at_10_before_compaction']:.4f} "
            f"| {manifest['recall_at_10']:.4f} | {fresh:.4f} | {seconds:.1f} |"
        )
        shutil.rmtree(out)
        shutil.rmtree(fresh_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="duet-tiny")
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--index-type", default="hnsw")
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--recall", action="store_true", help="updated vs fresh recall only")
    parser.add_argument("--skip-rates", action="store_true", help="searches idle vs busy only")
    parser.add_argument(
        "--adds-per-s",
        type=float,
        default=0.0,
        help="pace of adds beside searches (0: flat out)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.recall:
            updated_recall(root, args.vectors)
            return 0
        artifact, index_dir = build(root, args.model, args.vectors, args.index_type)
        dim = SearchIndex.load(index_dir, writable=False).dim
        print(f"# {args.model} (dim {dim}), {args.index_type} index of {args.vectors} vectors")
        rates = {} if args.skip_rates else in_process_adds(index_dir, root, args.duration_s)
        for batch, rate in rates.items():
            print(f"in process, embedding excluded, {batch:>2} per add: {rate:8.1f} items/s")
        proc, port = start_server(artifact, index_dir, batching=True)
        try:
            run_http(port, dim, args)
        finally:
            proc.terminate()
            proc.wait()
    return 0


def run_http(port: int, dim: int, args: argparse.Namespace) -> None:
    rate_rows = (("embedding", 1), ("embedding", 64), ("image", 1), ("image", 16))
    for kind, batch in () if args.skip_rates else rate_rows:
        requests = [add_request(port, dim, batch, kind, seed) for seed in range(8)]
        rate = asyncio.run(adds_per_second(port, requests, batch, args.duration_s))
        included = "excluded" if kind == "embedding" else "included"
        print(f"HTTP, by {kind:9}, embedding {included}, {batch:>2} per add: {rate:8.1f} items/s")
    rows: dict[bool, list[Result]] = {False: [], True: []}
    updates = [0, 0, 0]
    for round_ in range(args.rounds):
        for busy in (False, True) if round_ % 2 == 0 else (True, False):
            result, made = asyncio.run(
                searches(port, args.clients, args.duration_s, busy, dim, args.adds_per_s)
            )
            rows[busy].append(result)
            updates = [a + b for a, b in zip(updates, made, strict=True)]
    pace = f"{args.adds_per_s:g} items/s" if args.adds_per_s else "back to back"
    print(
        f"\n/search by text, {args.clients} clients, {args.rounds} rounds of {args.duration_s} s; "
        f"adds {pace}"
    )
    print("| searches | req/s | p50 ms | p99 ms | errors | updates meanwhile |")
    print("|---|---|---|---|---|---|")
    for busy in (False, True):
        merged = Result.merge(rows[busy])
        meanwhile = f"+{updates[0]} / -{updates[1]} items, {updates[2]} errors" if busy else "none"
        print(
            f"| {'while adding + deleting' if busy else 'idle'} "
            f"| {merged.requests / merged.seconds:.1f} | {merged.percentile(50):.1f} "
            f"| {merged.percentile(99):.1f} | {merged.errors} | {meanwhile} |"
        )


if __name__ == "__main__":
    sys.exit(main())
