"""Load test of the retrieval service: /search text queries over HTTP, dynamic batching on and off.

    python bench/serve_load.py [--vectors 100000] [--duration-s 10] [--clients 1,8,32]
                               [--model duet-tiny] [--index-type auto]

Builds a random-init artifact of `--model` and an index of `--vectors` synthetic unit vectors
(random directions: the index's size and shape matter here, not its content), then for each of
batching on and off starts `python -m serve` on a loopback port and drives POST /search
{"text": ..., "k": 10} from C concurrent clients (one httpx.AsyncClient, C tasks) for a fixed
time. Prints req/s, latency percentiles and errors per row, then the in-process time of encode +
search for one query (the same Encoder and SearchIndex, no HTTP), so HTTP's overhead is visible,
and the targets: 0 errors; batching >= 2x the req/s of per-request encoding at 32 clients; p99 <=
3x p50 at 8 clients; HTTP overhead <= 20% of the in-process time at 1 client.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

# Run as a script from anywhere: make the repository root importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common.artifact import load_artifact, write_artifact  # noqa: E402
from common.model import build_model  # noqa: E402
from serve.encoder import Encoder  # noqa: E402
from serve.index import SearchIndex, write_index  # noqa: E402
from serve.vector_search import IndexSpec  # noqa: E402

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLACES = ("top left", "top right", "bottom left", "bottom right", "center")
K = 10


def queries(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"a {rng.choice(('small', 'large'))} {rng.choice(COLORS)} {rng.choice(SHAPES)} "
        f"in the {rng.choice(PLACES)}"
        for _ in range(count)
    ]


def build(root: Path, model: str, vectors: int, index_type: str) -> tuple[Path, Path]:
    """A random-init artifact and an index of `vectors` random unit vectors of its dimension."""
    artifact = write_artifact(build_model(model), root / "artifact", provenance={})
    dim = load_artifact(artifact).model.embed_dim
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((vectors, dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    rows = [(f"{i:09d}", f"synthetic item {i}", {"n": i}) for i in range(vectors)]
    index = write_index(
        root / "index",
        embeddings,
        rows,
        {"model": {"name": model}},
        spec=IndexSpec(index_type=index_type, recall_queries=200),
    )
    return artifact, index


@dataclass
class Result:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(self.latencies_ms, q))


async def drive(base: str, clients: int, duration_s: float, texts: list[str]) -> Result:
    """`clients` tasks posting /search back to back until `duration_s` has passed."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, trust_env=False) as c:
        start = time.perf_counter()
        deadline = start + duration_s

        async def client(i: int) -> None:
            nonlocal errors
            n = i
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    response = await c.post("/search", json={"text": texts[n % len(texts)], "k": K})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append((time.perf_counter() - t0) * 1000)
                errors += not ok
                n += clients

        await asyncio.gather(*(client(i) for i in range(clients)))
        seconds = time.perf_counter() - start
    return Result(len(latencies), errors, seconds, latencies)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(artifact: Path, index: Path, batching: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        DUET_ARTIFACT_DIR=str(artifact),
        DUET_INDEX_DIR=str(index),
        DUET_PORT=str(port),
        DUET_BATCHING=str(batching).lower(),
        DUET_ACCESS_LOG="false",
        DUET_LOG_LEVEL="warning",
        DUET_MAX_QUEUE_ITEMS="4096",  # this measures latency under load, not refusals
    )
    proc = subprocess.Popen([sys.executable, "-m", "serve"], cwd=REPO_ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=base, timeout=10, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the server exited while loading")
            try:
                if client.get("/ready").status_code == 200:
                    for text in queries(20, seed=99):  # warm up
                        client.post("/search", json={"text": text, "k": K})
                    return proc, base
            except httpx.TransportError:
                pass
            time.sleep(0.3)
    proc.terminate()
    raise TimeoutError("the server did not become ready")


def in_process_ms(artifact: Path, index_dir: Path, texts: list[str]) -> float:
    """Median time of encode + search for one query, in this process, no HTTP."""
    encoder = Encoder(load_artifact(artifact))
    index = SearchIndex.load(index_dir, expected_dim=encoder.embed_dim)
    times = []
    for i, text in enumerate(texts):
        t0 = time.perf_counter()
        index.search(encoder.encode_texts([text]), K)
        if i >= 10:  # warm-up excluded
            times.append((time.perf_counter() - t0) * 1000)
    index.close()
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--model", default="duet-tiny")
    parser.add_argument("--index-type", default="auto", help="auto | flat | hnsw | ivfpq")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    texts = queries(1000)
    rows: dict[tuple[str, int], Result] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        print(f"building {args.model} artifact and an index of {args.vectors} vectors ...")
        artifact, index = build(Path(tmp), args.model, args.vectors, args.index_type)
        for batching in (True, False):
            mode = "on" if batching else "off"
            proc, base = start_server(artifact, index, batching)
            try:
                for clients in levels:
                    rows[mode, clients] = asyncio.run(drive(base, clients, args.duration_s, texts))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        local_ms = in_process_ms(artifact, index, texts[:110])
    print_table(rows, args, local_ms)
    return 0


def print_table(
    rows: dict[tuple[str, int], Result], args: argparse.Namespace, local_ms: float
) -> None:
    print(
        f"\n{args.model}, {args.vectors} vectors ({args.index_type}), k={K}, "
        f"{args.duration_s:.0f} s per row, {os.cpu_count()} CPUs\n"
    )
    print("| batching | clients | req/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (mode, clients), r in rows.items():
        print(
            f"| {mode} | {clients} | {r.requests / r.seconds:.1f} | {r.percentile(50):.1f} | "
            f"{r.percentile(95):.1f} | {r.percentile(99):.1f} | {r.errors} |"
        )
    print(f"\nin-process encode + search, one query: {local_ms:.2f} ms (median)")
    errors = sum(r.errors for r in rows.values())
    print(f"- errors: {errors} (target 0)")
    top = max(c for _, c in rows)
    on, off = rows["on", top], rows["off", top]
    ratio = (on.requests / on.seconds) / max(off.requests / off.seconds, 1e-9)
    print(f"- batching on/off req/s at {top} clients: {ratio:.2f}x (target >= 2)")
    if ("on", 8) in rows:
        r = rows["on", 8]
        print(
            f"- p99/p50 at 8 clients, batching on: {r.percentile(99) / r.percentile(50):.2f} (<= 3)"
        )
    if ("on", 1) in rows:
        overhead = rows["on", 1].percentile(50) / local_ms - 1
        print(f"- HTTP overhead at 1 client (p50 vs in-process): {100 * overhead:.0f}% (<= 20%)")


if __name__ == "__main__":
    sys.exit(main())
