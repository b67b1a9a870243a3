"""Costly requests against the running service, one kind at a time, while normal searches flow.

    python bench/attacks.py [--clients 8] [--rounds 3] [--duration-s 5] [--vectors 10000]
                            [--model duet-tiny|ViT-B-32] [--pace-s 0]
                            [--kinds tokenizer,ico,decode-flood,metadata-readers,big-body]

Builds a random-init artifact of `--model` (default `duet-tiny`) and a flat index of `--vectors`
synthetic rows whose metadata is img2dataset-sized (~2 KB a row: /metadata answers are as large
as a real index's), starts one `python -m serve` on a loopback port, and for every kind, every
round, drives C clients of normal traffic (/search, half text and half image queries, back to
back) for `--duration-s` twice: alone, and while the attack runs (in a process of its own); the
two rows alternate their order between rounds so that the machine's drift hits both alike, and
rounds are pooled. Each attack connection sends its requests back to back (a flood), or at most
one per `--pace-s` seconds.

The attacks (each the shape of one that hurt the service before it was bounded):
- tokenizer: /classify with 8 labels of 1,000 random letters in the template "{}" x 500, and
  /embed with 32 texts of 1,000 random letters, never the same letters twice, in turn;
- ico: 6 connections, each sending /embed with two ICO files whose 16 x 16 directory wraps a
  9,400 x 9,400 PNG (88 M pixels);
- decode-flood: 32 connections, each sending /embed with five 6,000 x 6,000 PNGs (a few KB each
  on the wire, 108 MB each decoded);
- metadata-readers: 50 connections that each send one /metadata for `max_metadata_ids` ids and
  never read the answer, plus 4 connections looping /metadata;
- big-body: one connection sending 30 MiB JSON bodies (/embed with base64 images that are not
  images).

Prints, per kind: the normal traffic's req/s under attack as a share of its calm req/s
(target >= 70%), its p99 against the calm p99 (target <= 3x), the attack's answers by status
and their median time, and the server's peak resident memory over its level when the attacked
row started (sampled every 0.1 s from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import multiprocessing
import random
import statistics
import string
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from bench.serve_load import (  # noqa: E402  # the service benchmark's client and server
    HOST,
    Connection,
    K,
    Result,
    drive_requests,
    json_request,
    parse_head,
    queries,
    search_request,
    start_server,
)
from common.artifact import load_artifact, write_artifact  # noqa: E402
from common.model import build_model  # noqa: E402
from serve.indexing.index import write_index  # noqa: E402
from serve.indexing.vector_search import IndexSpec  # noqa: E402
from serve.settings import Settings  # noqa: E402
from tests.serve_support import black_png  # noqa: E402

MIB = 1024 * 1024
PACE_S = 0.0  # --pace-s: each attack connection sends at most one request this often
ANSWER_GRACE_S = 10.0  # an attack request unanswered this long after its row ends is given up
KINDS = ("tokenizer", "ico", "decode-flood", "metadata-readers", "big-body")
Run = Callable[[float], Awaitable[list[tuple[int, float]]]]
"""deadline -> (status, seconds) of every attack request answered; status 0: the connection
ended without an answer (closed by the server, or still unanswered at the end)."""
Attack = Callable[[int], Run]
"""port -> the attack with its payloads made, ready to run until a deadline."""


def build(root: Path, model: str, vectors: int) -> tuple[Path, Path]:
    """A random-init artifact of `model` (random weights cost what trained ones do) and a flat
    index of random unit vectors with ~2 KB of caption and metadata per row, as img2dataset's."""
    artifact = write_artifact(build_model(model), root / "artifact", provenance={})
    dim = load_artifact(artifact).model.embed_dim
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((vectors, dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    filler = "x" * 1800
    rows = [
        (f"{i:09d}", f"synthetic item {i} " + "w" * 150, {"url": f"https://e/{i}", "exif": filler})
        for i in range(vectors)
    ]
    spec = IndexSpec(index_type="flat", recall_queries=0)
    manifest = {"model": {"name": model}}
    index = write_index(root / "index", embeddings, rows, manifest, spec=spec)
    return artifact, index


def normal_requests(port: int) -> list[bytes]:
    """/search by text and by a small photo-like image, alternating."""
    texts = queries(200)
    rng = np.random.default_rng(1)
    photos = []
    for _ in range(8):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        photos.append(base64.b64encode(buffer.getvalue()).decode())
    requests = []
    for i, text in enumerate(texts):
        requests.append(search_request(HOST, port, text))
        requests.append(json_request(HOST, port, "/search", {"image": photos[i % 8], "k": K}))
    return requests


def ico_wrapping(png: bytes) -> bytes:
    """An ICO file whose one directory entry says 16 x 16 and holds `png`."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def random_letters(rng: random.Random, count: int) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=count))


async def loop_requests(
    port: int, deadline: float, make: Callable[[int], bytes], max_requests: int = 10_000
) -> list[tuple[int, float]]:
    """One keep-alive connection sending `make(n)` back to back until `deadline`."""
    answers: list[tuple[int, float]] = []
    connection = await Connection.open(HOST, port)
    try:
        for n in range(max_requests):
            if time.perf_counter() >= deadline:
                break
            start = time.perf_counter()
            try:
                answer = connection.request(make(n))
                status, _ = await asyncio.wait_for(answer, deadline - start + ANSWER_GRACE_S)
            except TimeoutError:  # still unanswered well after the row: given up, as status 0
                answers.append((0, time.perf_counter() - start))
                break
            except (OSError, asyncio.IncompleteReadError, ValueError):
                answers.append((0, time.perf_counter() - start))
                connection.close()
                connection = await Connection.open(HOST, port)
                continue
            answers.append((status, time.perf_counter() - start))
            await asyncio.sleep(max(0.0, start + PACE_S - time.perf_counter()))
    finally:
        connection.close()
    return answers


async def in_parallel(connections: int, one: Callable[[], Awaitable[list[tuple[int, float]]]]):
    results = await asyncio.gather(*(one() for _ in range(connections)))
    return [answer for result in results for answer in result]


def tokenizer_attack(port: int) -> Run:
    rng = random.Random(0)
    image = base64.b64encode(black_png(32, 32, color_type=2)).decode()

    def make(n: int) -> bytes:
        if n % 2 == 0:
            labels = [random_letters(rng, 1000) for _ in range(8)]
            body = {"images": [image], "labels": labels, "templates": ["{}" * 500]}
            return json_request(HOST, port, "/classify", body)
        texts = [random_letters(rng, 1000) for _ in range(32)]
        return json_request(HOST, port, "/embed", {"texts": texts})

    return lambda deadline: loop_requests(port, deadline, make)


def ico_attack(port: int) -> Run:
    ico = base64.b64encode(ico_wrapping(black_png(9400, 9400))).decode()
    request = json_request(HOST, port, "/embed", {"images": [ico, ico]})
    return lambda deadline: in_parallel(6, lambda: loop_requests(port, deadline, lambda n: request))


def decode_flood_attack(port: int) -> Run:
    big = base64.b64encode(black_png(6000, 6000, color_type=2)).decode()
    request = json_request(HOST, port, "/embed", {"images": [big] * 5})
    return lambda deadline: in_parallel(
        32, lambda: loop_requests(port, deadline, lambda n: request)
    )


def metadata_readers_attack(port: int) -> Run:
    ids = list(range(Settings.model_fields["max_metadata_ids"].default))
    request = json_request(HOST, port, "/metadata", {"ids": ids})

    async def never_reads(deadline: float) -> list[tuple[int, float]]:
        """Send once and read nothing until the deadline; then drain what is there: 200 if the
        whole answer had waited for us, 0 if the server had closed the connection before."""
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(request)
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        status = await drained_status(reader)
        writer.close()
        return [(status, time.perf_counter() - start)]

    async def run(deadline: float) -> list[tuple[int, float]]:
        readers = in_parallel(50, lambda: never_reads(deadline))
        loopers = in_parallel(4, lambda: loop_requests(port, deadline, lambda n: request))
        first, second = await asyncio.gather(readers, loopers)
        return first + second

    return run


async def drained_status(reader: asyncio.StreamReader, timeout_s: float = 3.0) -> int:
    """The status of a complete answer waiting in `reader`, or 0 if it ends before one."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        status, length = parse_head(head)
        await asyncio.wait_for(reader.readexactly(length), timeout_s)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        return 0
    return status


def big_body_attack(port: int) -> Run:
    not_an_image = base64.b64encode(random.Random(2).randbytes(7 * MIB)).decode()
    request = json_request(HOST, port, "/embed", {"images": [not_an_image] * 3})
    return lambda deadline: loop_requests(port, deadline, lambda n: request)


ATTACKS: dict[str, Attack] = {
    "tokenizer": tokenizer_attack,
    "ico": ico_attack,
    "decode-flood": decode_flood_attack,
    "metadata-readers": metadata_readers_attack,
    "big-body": big_body_attack,
}


class PeakRss:
    """The largest VmRSS of process `pid` while the block runs (sampled every 0.1 s)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_bytes(self.pid))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class KindRows:
    calm: list[Result] = field(default_factory=list)
    attacked: list[Result] = field(default_factory=list)
    answers: list[tuple[int, float]] = field(default_factory=list)
    rss_growth: list[int] = field(default_factory=list)


def attacker_process(kind: str, port: int, duration_s: float, ready: Any, out: Any) -> None:
    """The attack in a process of its own: the bench's normal clients measure the service, not
    an event loop shared with the attack's clients. Its payloads are made before `ready`."""
    run = ATTACKS[kind](port)
    ready.wait()
    deadline = time.perf_counter() + duration_s

    async def until_deadline() -> list[tuple[int, float]]:
        return await run(deadline)

    out.put(asyncio.run(until_deadline()))


def attacked_row(
    pid: int, port: int, kind: str, args: argparse.Namespace, normal: list[bytes]
) -> tuple[Result, list[tuple[int, float]], int]:
    """Normal traffic while `kind` runs in another process: the normal traffic's result, the
    attack's answers and the server's peak RSS growth meanwhile."""
    context = multiprocessing.get_context("fork")  # no threads yet in this process
    ready, out = context.Event(), context.Queue()
    attacker = context.Process(
        target=attacker_process, args=(kind, port, args.duration_s, ready, out)
    )
    attacker.start()
    with PeakRss(pid) as rss:
        ready.set()
        result = asyncio.run(drive_requests(HOST, port, args.clients, args.duration_s, normal))
        answers = out.get(timeout=args.duration_s + ANSWER_GRACE_S + 60)
    attacker.join(timeout=60)
    return result, answers, rss.peak - rss.start


def run_kind(
    kind: str, pid: int, port: int, args: argparse.Namespace, normal: list[bytes]
) -> KindRows:
    rows = KindRows()
    for round_index in range(args.rounds):
        order = ("calm", "attacked") if round_index % 2 == 0 else ("attacked", "calm")
        for row in order:
            if row == "calm":
                calm = drive_requests(HOST, port, args.clients, args.duration_s, normal)
                rows.calm.append(asyncio.run(calm))
                continue
            result, answers, rss_growth = attacked_row(pid, port, kind, args, normal)
            time.sleep(1.0)  # what the attack left in flight settles before the next row
            rows.attacked.append(result)
            rows.answers += answers
            rows.rss_growth.append(rss_growth)
        print(
            f"{kind}, round {round_index + 1}: calm "
            f"{rate(rows.calm[-1]):.0f} req/s, attacked {rate(rows.attacked[-1]):.0f} req/s, "
            f"attack answers {dict(Counter(s for s, _ in rows.answers))}",
            flush=True,
        )
    return rows


def rate(result: Result) -> float:
    return result.requests / max(result.seconds, 1e-9)


def print_table(results: dict[str, KindRows], model: str, clients: int) -> None:
    pace = f"one request per {PACE_S:g} s per attack connection" if PACE_S else "back to back"
    print(
        f"\n{model}, normal traffic: {clients} clients of /search, half text, half image; "
        f"attacks {pace}\n"
    )
    print(
        "| attack | calm req/s | attacked req/s | kept | calm p99 ms | attacked p99 ms | p99 ratio "
        "| errors | attack answers | attack median s | peak RSS growth MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for kind, rows in results.items():
        calm, attacked = Result.merge(rows.calm), Result.merge(rows.attacked)
        kept = rate(attacked) / max(rate(calm), 1e-9)
        p99_ratio = attacked.percentile(99) / max(calm.percentile(99), 1e-9)
        statuses = Counter(status for status, _ in rows.answers)
        answers = ", ".join(f"{s or 'closed'}: {n}" for s, n in sorted(statuses.items()))
        median_s = statistics.median(s for _, s in rows.answers) if rows.answers else 0.0
        print(
            f"| {kind} | {rate(calm):.0f} | {rate(attacked):.0f} | {kept:.0%} "
            f"| {calm.percentile(99):.1f} | {attacked.percentile(99):.1f} | {p99_ratio:.2f}x "
            f"| {calm.errors + attacked.errors} | {answers} | {median_s:.2f} "
            f"| {max(rows.rss_growth) / MIB:.0f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--vectors", type=int, default=10_000)
    parser.add_argument("--model", default="duet-tiny", help="an open_clip name, random init")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument(
        "--pace-s",
        type=float,
        default=0.0,
        help="each attack connection sends at most one request per this many seconds "
        "(0: back to back, a flood)",
    )
    args = parser.parse_args()
    global PACE_S
    PACE_S = args.pace_s
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    results: dict[str, KindRows] = {}
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        print(f"building {args.model} and an index of {args.vectors} rows ...", flush=True)
        artifact, index = build(Path(tmp), args.model, args.vectors)
        defaults = {"DUET_MAX_QUEUE_ITEMS": str(Settings.model_fields["max_queue_items"].default)}
        proc, port = start_server(artifact, index, batching=True, env=defaults)
        try:
            normal = normal_requests(port)
            for kind in kinds:
                results[kind] = run_kind(kind, proc.pid, port, args, normal)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print_table(results, args.model, args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
