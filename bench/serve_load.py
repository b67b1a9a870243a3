"""Load test of the retrieval service: /search text queries over HTTP, dynamic batching on and off.

    python bench/serve_load.py [--vectors 100000] [--duration-s 5] [--rounds 3]
                               [--clients 1,8,32] [--model duet-tiny|ViT-B-32|ARTIFACT_DIR]
                               [--index-type auto] [--runtime auto|torch|onnx|onnx-int8]
                               [--busy N]

Builds a random-init artifact of `--model` (an open_clip name; random weights cost what trained
ones do) or uses the artifact directory it names, and an index of `--vectors` synthetic unit vectors
(random directions: the index's size and shape matter here, not its content), starts
`python -m serve` twice on loopback ports, with dynamic batching on and off, and drives POST
/search {"text": ..., "k": 10} from C concurrent keep-alive connections (asyncio, one task
each; see `Connection`) for a fixed time per row. Each round runs every row, on and off
back to back in alternating order, so that a change in the machine's speed hits both alike;
rounds are pooled. Prints req/s, latency percentiles and errors per row, and the in-process
time of encode + search for one query (the same Encoder and SearchIndex, no HTTP) next to the
same queries over HTTP from one client, in alternating blocks every round (`paired_ms`), so
HTTP's overhead is visible apart from the machine's drift. The same blocks go to a third
server, `bench/bare_search.py` (the same encode + search on a worker thread behind uvicorn,
no framework), whose overhead is the floor under the service's on this machine. Then the
targets:
0 errors; batching >= 2x the req/s of per-request encoding at 32 clients; p99 <= 3x p50 at 8
clients; HTTP overhead <= 20% of the in-process time at 1 client.

Under attack (`--attack-clients 8`, 0 to skip): the same C clients against the batching-on
server while one more client sends, back to back, the costliest requests the default limits
allow (`attack_payloads`): /classify with max_classify_prompts prompts never seen before, /classify
with max_request_pixels of images, /embed with max_items_per_request texts of max_text_chars.
Target: normal traffic keeps >= 70% of its req/s and p99 <= 3x its unloaded p99, in the same
rounds.

Beside other work (`--busy N`, instead of the rows above): one server per runtime, `--runtime`
and torch, batching on; each round runs every concurrency level on each server idle and beside
1 .. N busy processes this script starts and stops (`busy_processes`: a pure-Python loop each,
one core apiece, as a second service, a backup or a build would take). Prints req/s per row,
the fraction of its idle req/s each keeps and the texts per forward pass (from /metrics).
Target: `--runtime` keeps >= 70% at 1 and 8 clients. `--variant LABEL:DUET_X=v,DUET_Y=w`
(repeatable) serves `--runtime` with those settings instead of the pair, e.g. ONNX Runtime's
spinning and thread count: `--variant sleep:DUET_ONNX_SPINNING=false --variant
spin:DUET_ONNX_SPINNING=true`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

# Run as a script from anywhere: make the repository root importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common.artifact import load_artifact, write_artifact  # noqa: E402
from common.export import probe_image  # noqa: E402
from common.model import build_model  # noqa: E402
from common.onnx_towers import ONNX_DIR, export_onnx  # noqa: E402
from serve.encoder import Encoder  # noqa: E402
from serve.indexing.index import SearchIndex, write_index  # noqa: E402
from serve.indexing.vector_search import IndexSpec  # noqa: E402
from serve.runtime import load_encoder  # noqa: E402
from serve.settings import Settings  # noqa: E402
from tests.serve_support import black_png  # noqa: E402

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLACES = ("top left", "top right", "bottom left", "bottom right", "center")
K = 10
HOST = "127.0.0.1"
SEARCH_THREADS = Settings.model_fields["search_threads"].default


def queries(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"a {rng.choice(('small', 'large'))} {rng.choice(COLORS)} {rng.choice(SHAPES)} "
        f"in the {rng.choice(PLACES)}"
        for _ in range(count)
    ]


def build(root: Path, model: str, vectors: int, index_type: str) -> tuple[Path, Path]:
    """An artifact (`model`'s directory, or a random-init one of that name) and an index of
    `vectors` random unit vectors of its dimension. The random weights are seed 0's: the same
    model in every run (ViT-B-32's int8 towers keep a cosine of 0.990 to torch's with them,
    where other draws fall under the 0.99 gate)."""
    if Path(model).is_dir():
        artifact = Path(model)
    else:
        torch.manual_seed(0)
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
    batches: tuple[float, float] = (0.0, 0.0)  # (texts encoded, forward passes), if counted

    @classmethod
    def merge(cls, results: list[Result]) -> Result:
        """Several rounds' runs of one row as one: requests, errors, time and latencies pooled."""
        return cls(
            sum(r.requests for r in results),
            sum(r.errors for r in results),
            sum(r.seconds for r in results),
            [ms for r in results for ms in r.latencies_ms],
            (sum(r.batches[0] for r in results), sum(r.batches[1] for r in results)),
        )

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(self.latencies_ms, q))


class Connection:
    """One keep-alive HTTP/1.1 connection that posts prepared requests and reads the answers.

    A load generator on the same two cores as the server must cost little per request, or it
    measures itself: this one sends bytes built once per query and parses only the status line
    and Content-Length (~0.1 ms per request, against ~1 ms for an httpx client). Each answer's
    JSON is still read and its result count checked.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one request; (status, body) of its answer."""
        self.writer.write(raw)
        status, length = parse_head(await self.reader.readuntil(b"\r\n\r\n"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class BlockingConnection:
    """The same, with a blocking socket: for one client, whose own cost lands in the latency it
    measures. asyncio's streams add 0.1-0.3 ms a request on this machine; this adds ~0.03 ms.
    """

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""  # bytes read past the previous answer

    def request(self, raw: bytes) -> tuple[int, bytes]:
        self.sock.sendall(raw)
        data = self.pending
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += self._recv()
        status, length = parse_head(data[: end + 4])
        start = end + 4
        while len(data) < start + length:
            data += self._recv()
        self.pending = data[start + length :]
        return status, data[start : start + length]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def parse_head(head: bytes) -> tuple[int, int]:
    """An answer's status line and headers -> (status, Content-Length)."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            return status, int(line.split(":", 1)[1])
    raise ConnectionError(f"answer without Content-Length: {lines[0]!r}")


def search_request(host: str, port: int, text: str) -> bytes:
    body = json.dumps({"text": text, "k": K}).encode()
    head = (
        f"POST /search HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def answered(status: int, body: bytes) -> bool:
    return status == 200 and len(json.loads(body)["results"]) == K


async def drive(host: str, port: int, clients: int, duration_s: float, texts: list[str]) -> Result:
    """`clients` connections posting /search back to back until `duration_s` has passed."""
    requests = [search_request(host, port, text) for text in texts]
    return await drive_requests(host, port, clients, duration_s, requests)


async def drive_requests(
    host: str, port: int, clients: int, duration_s: float, requests: list[bytes]
) -> Result:
    """`drive` with prepared /search requests (any query kind answered with K results)."""
    latencies: list[float] = []
    errors = 0
    connections = [await Connection.open(host, port) for _ in range(clients)]
    start = time.perf_counter()
    deadline = start + duration_s

    async def client(i: int, connection: Connection) -> None:
        nonlocal errors
        n = i
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                ok = answered(*await connection.request(requests[n % len(requests)]))
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                ok = False
                print(f"client {i}: {exc!r}", file=sys.stderr)
                connection.close()
                connection = connections[i] = await Connection.open(host, port)
            latencies.append((time.perf_counter() - t0) * 1000)
            errors += not ok
            n += clients

    try:
        await asyncio.gather(*(client(i, c) for i, c in enumerate(connections)))
    finally:
        for connection in connections:
            connection.close()
    seconds = time.perf_counter() - start
    return Result(len(latencies), errors, seconds, latencies)


def json_request(host: str, port: int, path: str, body: object) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def attack_payloads(host: str, port: int, rounds: int) -> list[bytes]:
    """The costliest requests the default limits allow, `rounds` of each kind, cycled.

    Every /classify uses labels never sent before, so the prompt cache does not help it.
    """
    defaults = Settings.model_fields
    prompts = defaults["max_classify_prompts"].default
    templates = [f"photo {i} of a {{}}." for i in range(defaults["max_templates"].default)]
    labels_per_request = max(1, prompts // len(templates))
    side = int(defaults["max_image_pixels"].default ** 0.5)  # ~6324 x 6324, decoded ~120 MB
    images = defaults["max_request_pixels"].default // (side * side)
    image = base64.b64encode(black_png(side, side, color_type=2)).decode()
    long_text = ("a long text " * 100)[: defaults["max_text_chars"].default]
    small = base64.b64encode(black_png(32, 32, color_type=2)).decode()
    payloads = []
    for r in range(rounds):
        labels = [f"attack {r} label {i}" for i in range(labels_per_request)]
        payloads += [
            json_request(
                host,
                port,
                "/classify",
                {"images": [small], "labels": labels, "templates": templates},
            ),
            json_request(
                host, port, "/classify", {"images": [image] * images, "labels": ["a", "b"]}
            ),
            json_request(
                host,
                port,
                "/embed",
                {"texts": [long_text] * defaults["max_items_per_request"].default},
            ),
        ]
    return payloads


async def attacker(host: str, port: int, deadline: float, payloads: list[bytes]) -> list[int]:
    """Send `payloads` one after another until `deadline`; their statuses."""
    connection = await Connection.open(host, port)
    statuses = []
    try:
        for raw in payloads:
            if time.perf_counter() >= deadline:
                break
            statuses.append((await connection.request(raw))[0])
    finally:
        connection.close()
    return statuses


async def drive_under_attack(
    host: str, port: int, clients: int, duration_s: float, texts: list[str], payloads: list[bytes]
) -> tuple[Result, list[int]]:
    """`drive` while one more connection sends `payloads`; the normal traffic's result and the
    attack's statuses."""
    deadline = time.perf_counter() + duration_s
    normal, statuses = await asyncio.gather(
        drive(host, port, clients, duration_s, texts), attacker(host, port, deadline, payloads)
    )
    return normal, statuses


def paired_ms(
    local: InProcess, ports: dict[str, int], texts: list[str], blocks: int = 10
) -> dict[str, list[float]]:
    """The same queries in-process and over HTTP to each of `ports` (one client), alternating.

    The machine's speed drifts by tens of percent within minutes here; blocks of a few dozen
    queries each way see it at the same speed, so the ratio of two medians is HTTP's overhead
    and not the drift. Returns ms per query by name ("in-process" and each of `ports`), after
    a warm-up block of each.
    """
    block = max(1, len(texts) // blocks)
    times: dict[str, list[float]] = {"in-process": [], **{name: [] for name in ports}}
    for b in range(blocks + 1):
        chunk = texts[b * block % len(texts) :][:block]
        block_ms = {"in-process": local.times_ms(chunk, warmup=0)}
        for name, port in ports.items():
            # a connection per block: at ViT-B-32's speed the in-process block outlasts the
            # server's keep-alive timeout, which would close a connection kept between blocks
            connection = BlockingConnection(HOST, port)
            block_ms[name] = []
            try:
                for raw in [search_request(HOST, port, text) for text in chunk]:
                    t0 = time.perf_counter()
                    if not answered(*connection.request(raw)):
                        raise RuntimeError(f"{name} did not answer a paired query")
                    block_ms[name].append((time.perf_counter() - t0) * 1000)
            finally:
                connection.close()
        if b > 0:  # the first block warms them up
            for name, ms in block_ms.items():
                times[name] += ms
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    artifact: Path,
    index: Path,
    batching: bool,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    root: Path = REPO_ROOT,
) -> tuple[subprocess.Popen, int]:
    """`python -m serve` (or `command`) on a free loopback port, once /ready and warmed up;
    `env`: more (or other) DUET_* settings; `root`: the checkout whose code it runs."""
    port = free_port()
    server_env = dict(os.environ)
    server_env.update(
        PYTHONPATH=str(root),
        DUET_ARTIFACT_DIR=str(artifact),
        DUET_INDEX_DIR=str(index),
        DUET_PORT=str(port),
        DUET_BATCHING=str(batching).lower(),
        DUET_ACCESS_LOG="false",
        DUET_LOG_LEVEL="warning",
        DUET_MAX_QUEUE_ITEMS="4096",  # this measures latency under load, not refusals
    )
    server_env.update(env or {})
    command = command or [sys.executable, "-m", "serve"]
    proc = subprocess.Popen(command, cwd=root, env=server_env)
    base = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=base, timeout=10, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the server exited while loading")
            try:
                if client.get("/ready").status_code == 200:
                    for text in queries(20, seed=99):  # warm up
                        client.post("/search", json={"text": text, "k": K})
                    return proc, port
            except httpx.TransportError:
                pass
            time.sleep(0.3)
    proc.terminate()
    raise TimeoutError("the server did not become ready")


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes, each spinning one core in a pure-Python loop, until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let the scheduler see them
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)


def server_variants(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """label -> the servers' settings: `--runtime` and torch, or `--runtime` per `--variant`."""
    if not args.variant:
        runtimes = dict.fromkeys([args.runtime, "torch"])
        return {r: {"DUET_RUNTIME": r} for r in runtimes}
    variants = {}
    for spec in args.variant:
        label, _, assignments = spec.partition(":")
        env = dict(a.split("=", 1) for a in assignments.split(",") if a)
        variants[label] = {"DUET_RUNTIME": args.runtime} | env
    return variants


def batched_texts(port: int) -> tuple[float, float]:
    """(texts encoded, forward passes) so far: the server's duet_encode_batch_size histogram."""
    metrics = httpx.get(f"http://{HOST}:{port}/metrics", timeout=30, trust_env=False).text
    totals = {"sum": 0.0, "count": 0.0}
    for line in metrics.splitlines():
        for part in totals:
            if line.startswith(f'duet_encode_batch_size_{part}{{kind="text"}}'):
                totals[part] += float(line.split()[-1])
    return totals["sum"], totals["count"]


def busy_rows(
    artifact: Path, index: Path, args: argparse.Namespace, levels: list[int], texts: list[str]
) -> dict[tuple[str, int, int], Result]:
    """(server, busy processes, clients) -> the pooled result of that row over the rounds."""
    variants = server_variants(args)
    servers = {n: start_server(artifact, index, True, env=env) for n, env in variants.items()}
    rows: dict[tuple[str, int, int], list[Result]] = {}
    try:
        for round_index in range(args.rounds):
            for busy in range(args.busy + 1):
                with busy_processes(busy):
                    for name, clients in itertools.product(servers, levels):
                        port = servers[name][1]
                        before = batched_texts(port)
                        result = asyncio.run(drive(HOST, port, clients, args.duration_s, texts))
                        after = batched_texts(port)
                        result.batches = (after[0] - before[0], after[1] - before[1])
                        rows.setdefault((name, busy, clients), []).append(result)
                        print(
                            f"round {round_index + 1}: {name}, busy {busy}, {clients} "
                            f"clients: {result.requests / result.seconds:.1f} req/s",
                            flush=True,
                        )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    return {key: Result.merge(results) for key, results in rows.items()}


def print_busy(rows: dict[tuple[str, int, int], Result], args: argparse.Namespace) -> None:
    """req/s per row and the fraction of the idle row's req/s it keeps."""

    def rate(r: Result) -> float:
        return r.requests / r.seconds

    def kept(runtime: str, busy: int, clients: int) -> float:
        return rate(rows[runtime, busy, clients]) / max(rate(rows[runtime, 0, clients]), 1e-9)

    print(
        f"\n{args.model}, {args.vectors} vectors, k={K}, batching on, {args.rounds} rounds x "
        f"{args.duration_s:.0f} s per row, {os.cpu_count()} CPUs, load average before: "
        f"{args.load_before}\n"
    )
    print("| server | beside | clients | req/s | p50 ms | p99 ms | kept | texts/pass | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (runtime, busy, clients), r in sorted(rows.items()):
        beside = "idle" if busy == 0 else f"{busy} busy"
        per_pass = r.batches[0] / max(r.batches[1], 1)
        print(
            f"| {runtime} | {beside} | {clients} | {rate(r):.1f} | {r.percentile(50):.1f} | "
            f"{r.percentile(99):.1f} | {kept(runtime, busy, clients):.0%} | {per_pass:.2f} | "
            f"{r.errors} |"
        )
    for server in dict.fromkeys(runtime for runtime, _, _ in rows):
        worst = min(kept(*key) for key in rows if key[0] == server and key[2] in (1, 8))
        print(f"- {server}: lowest kept fraction at 1 and 8 clients {worst:.0%} (target >= 70%)")
    print(f"- load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


class InProcess:
    """Encode + search for one query in this process, no HTTP: the same Encoder and SearchIndex.

    FAISS gets the service's threads per search (`search_threads`): with its default of every
    core, its OpenMP team would spin against torch's and slow both.
    """

    def __init__(self, artifact: Path, index_dir: Path) -> None:
        settings = Settings(artifact_dir=artifact, index_dir=index_dir)  # DUET_RUNTIME from env
        self.encoder: Encoder = load_encoder(settings)[0]
        self.index = SearchIndex.load(
            index_dir, expected_dim=self.encoder.embed_dim, threads=SEARCH_THREADS
        )

    def times_ms(self, texts: list[str], warmup: int = 10) -> list[float]:
        times = []
        for i, text in enumerate(texts):
            t0 = time.perf_counter()
            self.index.search(self.encoder.encode_texts([text]), K)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
        return times

    def encode_ms(self, repeats: int = 30, warmup: int = 3) -> dict[str, float]:
        """Median in-process encode time of one text and of one image (a 320x240 photo-sized
        probe, resized by the artifact's own transform), without search."""
        text, image = queries(1, seed=7)[0], probe_image()
        calls = {
            "text": lambda: self.encoder.encode_texts([text]),
            "image": lambda: self.encoder.encode_images([image]),
        }
        medians = {}
        for kind, call in calls.items():
            times = []
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                call()
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1000)
            medians[kind] = statistics.median(times)
        return medians

    def close(self) -> None:
        self.index.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--duration-s", type=float, default=5.0, help="seconds per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--model", default="duet-tiny")
    parser.add_argument("--index-type", default="auto", help="auto | flat | hnsw | ivfpq")
    parser.add_argument(
        "--attack-clients", type=int, default=8, help="clients of the under-attack row (0: none)"
    )
    parser.add_argument(
        "--runtime", default="auto", help="DUET_RUNTIME of every server: auto|torch|onnx|onnx-int8"
    )
    parser.add_argument(
        "--busy", type=int, default=0, help="rows beside 1..N busy processes instead (0: off)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="with --busy: LABEL:DUET_X=v,... one server of --runtime with these settings each "
        "(repeatable), instead of --runtime and torch",
    )
    args = parser.parse_args()
    os.environ["DUET_RUNTIME"] = args.runtime  # the servers' and the in-process reference's
    levels = [int(c) for c in args.clients.split(",")]
    texts = queries(1000)
    if args.busy:
        args.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
            print(f"building {args.model} artifact and an index of {args.vectors} vectors ...")
            artifact, index = build(Path(tmp), args.model, args.vectors, args.index_type)
            print_busy(busy_rows(artifact, index, args, levels, texts), args)
        return 0
    rows: dict[tuple[str, int], list[Result]] = {}
    paired: dict[str, list[float]] = {}
    attack_statuses: list[int] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        print(f"building {args.model} artifact and an index of {args.vectors} vectors ...")
        artifact, index = build(Path(tmp), args.model, args.vectors, args.index_type)
        if args.runtime in ("onnx", "onnx-int8") and not (artifact / ONNX_DIR).is_dir():
            print("exporting the ONNX towers ...")
            export_onnx(artifact, int8=args.runtime == "onnx-int8")
        servers = {"on": start_server(artifact, index, True)}
        servers["off"] = start_server(artifact, index, False)
        bare = [sys.executable, str(Path(__file__).with_name("bare_search.py"))]
        servers["bare"] = start_server(artifact, index, True, command=bare)
        local = InProcess(artifact, index)
        encode = local.encode_ms()
        try:
            for round_index in range(args.rounds):
                modes = ["on", "off"] if round_index % 2 == 0 else ["off", "on"]
                for clients in levels:
                    if clients == 1:  # the in-process reference, paired with HTTP queries
                        ports = {"service": servers["on"][1], "bare": servers["bare"][1]}
                        for name, ms in paired_ms(local, ports, texts[:400]).items():
                            paired.setdefault(name, []).extend(ms)
                    for mode in modes:
                        result = asyncio.run(
                            drive(HOST, servers[mode][1], clients, args.duration_s, texts)
                        )
                        rows.setdefault((mode, clients), []).append(result)
                        print(
                            f"round {round_index + 1}: batching {mode}, {clients} clients: "
                            f"{result.requests / result.seconds:.1f} req/s",
                            flush=True,
                        )
                    if clients == args.attack_clients:
                        port = servers["on"][1]
                        payloads = attack_payloads(HOST, port, rounds=50)
                        result, statuses = asyncio.run(
                            drive_under_attack(
                                HOST, port, clients, args.duration_s, texts, payloads
                            )
                        )
                        rows.setdefault(("on, under attack", clients), []).append(result)
                        attack_statuses += statuses
                        print(
                            f"round {round_index + 1}: under attack, {clients} clients: "
                            f"{result.requests / result.seconds:.1f} req/s; attack {statuses}",
                            flush=True,
                        )
        finally:
            local.close()
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    order = sorted(rows, key=lambda key: (key[0] != "on", key[1]))
    merged = {key: Result.merge(rows[key]) for key in order}
    print_table(merged, args, paired)
    if attack_statuses:
        print_attack(merged, args.attack_clients, attack_statuses)
    print(
        f"- in-process encode, batch 1 (median): text {encode['text']:.1f} ms, "
        f"image {encode['image']:.1f} ms"
    )
    return 0


def print_table(
    rows: dict[tuple[str, int], Result],
    args: argparse.Namespace,
    paired: dict[str, list[float]],
) -> None:
    print(
        f"\n{args.model} ({args.runtime}), {args.vectors} vectors ({args.index_type}), k={K}, "
        f"{args.rounds} rounds x {args.duration_s:.0f} s per row (on and off alternating), "
        f"{os.cpu_count()} CPUs\n"
    )
    print("| batching | clients | req/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (mode, clients), r in rows.items():
        print(
            f"| {mode} | {clients} | {r.requests / r.seconds:.1f} | {r.percentile(50):.1f} | "
            f"{r.percentile(95):.1f} | {r.percentile(99):.1f} | {r.errors} |"
        )
    p50 = {name: statistics.median(ms) for name, ms in paired.items()}
    if p50:
        print(
            f"\none query, one client, paired blocks (median of {len(paired['in-process'])} "
            f"each): in-process encode + search {p50['in-process']:.2f} ms, over HTTP "
            f"{p50['service']:.2f} ms (the service), {p50['bare']:.2f} ms (bare_search.py: "
            "uvicorn + one thread hand-off, no framework: the floor)"
        )
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
    if p50:
        overhead, floor = (p50[name] / p50["in-process"] - 1 for name in ("service", "bare"))
        print(
            f"- HTTP overhead at 1 client (paired p50s): {100 * overhead:.0f}% (<= 20%); "
            f"the bare floor: {100 * floor:.0f}%"
        )


def print_attack(rows: dict[tuple[str, int], Result], clients: int, statuses: list[int]) -> None:
    """The under-attack row against the unloaded one at the same concurrency."""
    calm, attacked = rows["on", clients], rows["on, under attack", clients]
    kept = (attacked.requests / attacked.seconds) / max(calm.requests / calm.seconds, 1e-9)
    p99_ratio = attacked.percentile(99) / max(calm.percentile(99), 1e-9)
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    print(
        f"- under attack at {clients} clients: {kept:.0%} of the unloaded req/s (target >= 70%), "
        f"p99 {p99_ratio:.2f}x the unloaded p99 (target <= 3x); attack requests by status: "
        f"{counts}"
    )


if __name__ == "__main__":
    sys.exit(main())
