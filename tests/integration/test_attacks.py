"""The running service under attack: each costly or malformed request is refused quickly with the
error envelope while concurrent valid requests all succeed, memory stays bounded, and the server
is healthy afterwards.

One `python -m serve` (duet-micro, 32-pixel inputs) on a loopback port serves the whole module;
attacks and valid traffic go only to it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import random
import re
import socket
import string
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from PIL import Image

from tests.conftest import free_port, running_service, subprocess_env
from tests.serve_support import (
    assert_envelope,
    b64,
    black_png,
    make_artifact,
    make_index,
    make_shard,
    png,
)
from train import synth

pytestmark = pytest.mark.slow
T = TypeVar("T")

MIB = 1024 * 1024
HEADER_TIMEOUT_S = BODY_TIMEOUT_S = 1.5
QUICK_S = 5.0  # an attack is answered within this (seconds, not tens of seconds)
RSS_GROWTH_BOUND = 600 * MIB  # over the baseline, during and after an attack
VALID_WORKERS = 3


@dataclass
class Fixture:
    base: str
    index_dir: Path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    root = tmp_path_factory.mktemp("attacks")
    artifact = make_artifact(root)
    index = make_index(artifact, make_shard(root / "synth", 16), root / "index")
    victim = make_index(artifact, make_shard(root / "synth2", 8, seed=1), root / "victim")
    env = {
        "DUET_INDICES": json.dumps({"victim": str(victim)}),
        "DUET_IMAGE_URL_FETCH": "true",  # on, to attack its URL parsing (hosts stay public-only)
        "DUET_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "DUET_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "DUET_ACCESS_LOG": "false",
        "DUET_LOG_LEVEL": "warning",
    }
    with running_service(artifact, index, env=env) as base:
        yield Fixture(base, victim)


@dataclass
class Traffic:
    """Valid searches (text and image) sent from worker threads while an attack runs."""

    base: str
    statuses: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def worker(self, n: int) -> None:
        bodies = [{"text": "a red circle", "k": 3}, {"image": b64(png(24)), "k": 3}]
        with httpx.Client(base_url=self.base, timeout=30, trust_env=False) as client:
            sent = 0
            while (not self.stop.is_set() or sent < 4) and sent < 200:
                response = client.post("/search", json=bodies[(n + sent) % 2])
                self.statuses.append(response.status_code)
                sent += 1


def under_attack(base: str, attack: Callable[[], object]) -> tuple[object, float, list[int]]:
    """Run `attack()` while valid traffic flows; its result, its duration, the valid statuses."""
    traffic = Traffic(base)
    workers = [threading.Thread(target=traffic.worker, args=(n,)) for n in range(VALID_WORKERS)]
    for worker in workers:
        worker.start()
    time.sleep(0.2)  # the valid requests are in flight when the attack arrives
    start = time.monotonic()
    try:
        result = attack()
    finally:
        elapsed = time.monotonic() - start
        traffic.stop.set()
        for worker in workers:
            worker.join(60)
    return result, elapsed, traffic.statuses


def post(base: str, path: str, **kwargs: object) -> httpx.Response:
    # 120 s: 2,048 prompts beside the valid traffic took over 60 s on a loaded 2-core machine;
    # what these tests check is the status and the cost, not the time
    with httpx.Client(base_url=base, timeout=120, trust_env=False) as client:
        return client.post(path, **kwargs)  # type: ignore[arg-type]


def rss_bytes(base: str) -> int:
    metrics = httpx.get(f"{base}/metrics", timeout=10, trust_env=False).text
    found = re.search(r"^process_resident_memory_bytes (\S+)$", metrics, re.MULTILINE)
    assert found, "no process_resident_memory_bytes in /metrics"
    return int(float(found.group(1)))


def peak_rss_growth(base: str, action: Callable[[], T]) -> tuple[T, int]:
    """`action()`'s result and the most the server's RSS grew over its baseline meanwhile."""
    baseline = rss_bytes(base)
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak.append(rss_bytes(base))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = action()
    finally:
        done.set()
        sampler.join()
    peak.append(rss_bytes(base))
    return result, max(peak) - baseline


def concurrently(count: int, call: Callable[[], object], timeout_s: float = 120) -> None:
    """`call()` on `count` threads at once; returns when all are done (or `timeout_s` passed)."""
    threads = [threading.Thread(target=call) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)


def assert_healthy(base: str) -> None:
    assert httpx.get(f"{base}/ready", timeout=10, trust_env=False).status_code == 200
    search = post(base, "/search", json={"text": "blue square", "k": 2})
    assert search.status_code == 200, search.text


def attack_and_check(
    base: str, attack: Callable[[], httpx.Response], status: int, type_: str
) -> dict[str, object]:
    """The attack gets `status`/`type_` quickly, every valid request 200, memory bounded."""
    baseline = rss_bytes(base)
    response, elapsed, statuses = under_attack(base, attack)
    assert isinstance(response, httpx.Response)
    body = assert_envelope(response, status, type_)
    assert elapsed < QUICK_S, f"the attack took {elapsed:.1f} s to refuse"
    assert statuses and set(statuses) == {200}, f"valid requests got {sorted(set(statuses))}"
    assert rss_bytes(base) - baseline < RSS_GROWTH_BOUND
    assert_healthy(base)
    return body


# --- 1, 2: images whose resize would explode ---


@pytest.mark.parametrize(
    ("width", "height"),
    [(40_000_000, 1), (1, 100_000), (1, 1_000_000)],
    ids=["wide-40M-x-1", "thin-1-x-100k", "thin-1-x-1M"],
)
def test_thin_images_are_refused_from_their_header(
    service: Fixture, width: int, height: int
) -> None:
    data = black_png(width, height)

    def attack() -> httpx.Response:
        return post(service.base, "/search", files={"image": ("thin.png", data, "image/png")})

    body = attack_and_check(service.base, attack, 413, "image_too_large")
    assert "max_resized_pixels" in str(body["error"]) or "resized" in str(body["error"])


# --- 3: /classify cost ---


def test_classify_over_the_prompt_budget_is_refused_naming_the_limit(service: Fixture) -> None:
    labels = [f"label number {i}" for i in range(256)]
    templates = [f"template {i} of a {{}}." for i in range(32)]
    body = {"images": [b64(png(24))], "labels": labels, "templates": templates}
    error = attack_and_check(
        service.base, lambda: post(service.base, "/classify", json=body), 422, "validation_error"
    )
    assert "max_classify_prompts" in str(error["error"])


def test_classify_within_budget_takes_turns_and_is_cached(service: Fixture) -> None:
    """2048 prompts (the default budget) while searches flow: nobody gets 429; the same labels
    again encode no text at all."""
    labels = [f"shape {i}" for i in range(64)]
    templates = [f"a photo {i} of a {{}}." for i in range(32)]
    body = {"images": [b64(png(24))], "labels": labels, "templates": templates}
    response, _, statuses = under_attack(
        service.base, lambda: post(service.base, "/classify", json=body)
    )
    assert isinstance(response, httpx.Response) and response.status_code == 200, response
    assert set(statuses) == {200}
    encoded = text_batches(service.base)
    again = post(service.base, "/classify", json=body)
    assert again.status_code == 200
    first, second = response.json()["predictions"], again.json()["predictions"]
    assert [p["probability"] for p in second] == pytest.approx(
        [p["probability"] for p in first], abs=1e-5
    )
    assert text_batches(service.base) == encoded  # every prompt came from the cache


def text_batches(base: str) -> float:
    metrics = httpx.get(f"{base}/metrics", timeout=10, trust_env=False).text
    found = re.search(r'^duet_encode_batch_size_count\{kind="text"\} (\S+)$', metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# --- 4: decoded-pixel amplification ---


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return black_png(6000, 6000, color_type=2)  # ~100 KB that decodes to 108 MB


def test_many_large_images_are_charged_before_decoding(service: Fixture, big_png: bytes) -> None:
    body = {"images": [b64(big_png)] * 8, "labels": ["black", "white"]}
    error = attack_and_check(
        service.base, lambda: post(service.base, "/classify", json=body), 413, "image_too_large"
    )
    assert "max_request_pixels" in str(error["error"])


def test_large_images_are_decoded_one_at_a_time_and_memory_returns(
    service: Fixture, big_png: bytes
) -> None:
    """Two concurrent /classify of 4 x 108 MB images within the budget: all answered, RSS never
    holds more than the decode threads' images, and it comes back down afterwards."""
    baseline = rss_bytes(service.base)
    body = {"images": [b64(big_png)] * 4, "labels": ["black", "white"]}
    answers: list[httpx.Response] = []

    def one() -> None:
        answers.append(post(service.base, "/classify", json=body))

    _, growth = peak_rss_growth(service.base, lambda: concurrently(2, one))
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["predictions"][0]["label"] in ("black", "white")
    assert growth < RSS_GROWTH_BOUND, f"peak {growth / MIB:.0f} MiB"
    assert rss_bytes(service.base) - baseline < 200 * MIB
    assert_healthy(service.base)


# --- 6: slowloris and header limits ---


def slow_client(base: str, first: bytes, trickle: bytes) -> tuple[bytes, float]:
    """Send `first`, then `trickle` every 0.3 s; what the server answers and when it closed."""
    host, port = base.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(first)
        sock.settimeout(0.3)
        received = b""
        while time.monotonic() - start < 30:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(trickle)
                except OSError:
                    break
                continue
            except OSError:
                break
            if not data:
                break
            received += data
    return received, time.monotonic() - start


@pytest.mark.parametrize(
    ("first", "trickle"),
    [
        (b"POST /search HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n"),
        (
            b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{",
            b" ",
        ),
    ],
    ids=["headers", "body"],
)
def test_slowloris_connections_are_closed_after_their_deadline(
    service: Fixture, first: bytes, trickle: bytes
) -> None:
    (answer, closed_after_s), _, statuses = under_attack(
        service.base, lambda: slow_client(service.base, first, trickle)
    )
    assert closed_after_s < HEADER_TIMEOUT_S + 3, f"held open {closed_after_s:.1f} s"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"type": "timeout"' in answer
    assert set(statuses) == {200}
    assert_healthy(service.base)


@pytest.mark.parametrize(
    "headers",
    [{f"x-h{i}": "1" for i in range(300)}, {"x-big": "a" * 64 * 1024}],
    ids=["many-headers", "huge-header"],
)
def test_oversized_headers_get_431(service: Fixture, headers: dict[str, str]) -> None:
    attack_and_check(
        service.base,
        lambda: post(service.base, "/search", json={"text": "x"}, headers=headers),
        431,
        "headers_too_large",
    )


def test_the_http_servers_refusals_under_v1_use_openais_envelope(service: Fixture) -> None:
    headers = {"x-big": "a" * 64 * 1024}
    response = post(service.base, "/v1/embeddings", json={"input": "x"}, headers=headers)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"


# --- 7: the smaller ones ---


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/search", {"id": 2**63}, 422),
        ("/search", {"id": 2**64 + 5}, 422),
        ("/search", {"text": "x", "k": True}, 422),
        ("/metadata", {"ids": [2**63]}, 422),
        ("/knn-service", {"image_url": "http://127.0.0.1:65536/"}, 400),
        ("/knn-service", {"image_url": "http://[::1/"}, 400),
    ],
    ids=["id-2^63", "id-2^64", "k-true", "metadata-2^63", "url-port-65536", "url-bad-ipv6"],
)
def test_malformed_values_get_4xx_not_500(
    service: Fixture, path: str, body: dict[str, object], status: int
) -> None:
    response = post(service.base, path, json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "type"}


def test_head_health(service: Fixture) -> None:
    response = httpx.head(f"{service.base}/health", timeout=10, trust_env=False)
    assert response.status_code == 200


def _replace(path: Path, data: bytes) -> None:
    """Write a new file over `path` as an index update does (rename): the loaded version keeps
    its open files."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


def _manifest(**changes: object) -> Callable[[Path], object]:
    def corrupt(directory: Path) -> None:
        path = directory / "index.json"
        _replace(path, json.dumps({**json.loads(path.read_text()), **changes}).encode())

    return corrupt


def _file(name: str, data: bytes) -> Callable[[Path], object]:
    return lambda directory: _replace(directory / name, data)


@pytest.mark.parametrize(
    "corrupt",
    [
        _manifest(model=[1]),
        _manifest(search_params=[1]),
        _manifest(rerank_factor="x"),
        _manifest(dim="sixty-four"),
        _file("index.json", b"[1, 2, 3]"),
        _file("metadata.sqlite", b"SQLite format 3\x00" + b"\x00" * 200),
        _file("vectors.npy", b"\x93NUMPY\x01\x00" + b"{" * 100),
    ],
    ids=[
        "model-list",
        "search-params-list",
        "rerank-str",
        "dim-str",
        "manifest-list",
        "metadata-empty",
        "vectors-header",
    ],
)
def test_reload_of_a_corrupted_index_is_409_and_the_old_one_serves(
    service: Fixture, corrupt: Callable[[Path], object]
) -> None:
    saved = {path.name: path.read_bytes() for path in service.index_dir.iterdir() if path.is_file()}
    try:
        corrupt(service.index_dir)
        response = post(service.base, "/indices/victim/reload")
        assert_envelope(response, 409, "reload_failed")
        search = post(service.base, "/search", json={"text": "x", "k": 2, "index": "victim"})
        assert search.status_code == 200
    finally:
        for name, data in saved.items():
            _replace(service.index_dir / name, data)


# --- slow readers, amplification, fetch ---

SEND_TIMEOUT_S = 1.5
FETCH_TIMEOUT_S = 2.0
FETCH_HOST = "127.0.0.2"  # the only non-public address this service may fetch from
ROWS = 200
METADATA_IDS = list(range(ROWS)) * 5  # 1000 ids, the most one request may ask for


@pytest.fixture(scope="module")
def net_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A service over ROWS rows with 128-pixel thumbnails (/metadata answers of several MB, more
    than the kernel buffers), a short send deadline, image_url fetching from FETCH_HOST only."""
    root = tmp_path_factory.mktemp("net")
    artifact = make_artifact(root)
    synth.generate(
        root / "synth",
        train_shards=1,
        samples_per_shard=ROWS,
        seed=0,
        val_samples=1,
        image_size=128,
    )
    index = make_index(artifact, str(root / "synth/train/shard-000000.tar"), root / "index")
    env = {
        "DUET_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
        "DUET_IMAGE_URL_FETCH": "true",
        "DUET_IMAGE_URL_TIMEOUT_S": str(FETCH_TIMEOUT_S),
        "DUET_IMAGE_URL_ALLOWED_NETWORKS": json.dumps([f"{FETCH_HOST}/32"]),
        "DUET_ACCESS_LOG": "false",
        "DUET_LOG_LEVEL": "warning",
    }
    with running_service(artifact, index, env=env) as base:
        yield base


def service_pid(base: str) -> int:
    """The pid of the `python -m serve` listening at `base` (found by its DUET_PORT)."""
    wanted = f"DUET_PORT={base.rsplit(':', 1)[1]}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and wanted in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no process with {wanted.decode()}")


def threads_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(re.search(r"^Threads:\s+(\d+)$", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
    return threads, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def metadata_request(ids: list[int]) -> bytes:
    body = json.dumps({"ids": ids}).encode()
    head = f"POST /metadata HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def server_end_open(sock: socket.socket) -> bool:
    """Whether the server's end of `sock`'s connection is still ESTABLISHED (/proc/net/tcp):
    seen without reading, since a close waits behind the unread data and reaches the client
    only when it reads. IPv4 loopback only, as the test service listens."""

    def address(host_port: tuple[str, int]) -> str:
        host, port = host_port
        return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"

    server, client = address(sock.getpeername()), address(sock.getsockname())
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if (local, remote) == (server, client):
            return state == "01"  # TCP_ESTABLISHED
    return False  # gone: reset


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[int, bool]:
    """(bytes read, whether the server closed or reset the connection within `timeout_s`)."""
    sock.settimeout(timeout_s)
    received = 0
    try:
        while data := sock.recv(1 << 20):
            received += len(data)
    except TimeoutError:
        return received, False
    except OSError:
        pass  # reset: the server aborted the connection
    return received, True


def test_answers_nobody_reads_are_dropped_at_the_send_deadline(net_service: str) -> None:
    """20 connections ask for a large /metadata answer and never read it: each is aborted after
    the send deadline (so it cannot hold the answer's memory), and the service stays healthy."""
    full = post(net_service, "/metadata", json={"ids": METADATA_IDS})
    assert full.status_code == 200 and len(full.content) > 5 * MIB, len(full.content)
    host, port = net_service.removeprefix("http://").split(":")
    baseline = rss_bytes(net_service)
    readers = []
    for _ in range(20):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: no reading
        sock.connect((host, int(port)))
        sock.sendall(metadata_request(METADATA_IDS))
        readers.append(sock)
    try:
        time.sleep(SEND_TIMEOUT_S + 2.5)
        assert rss_bytes(net_service) - baseline < 100 * MIB
        # each deadline runs from when its answer started to go out, which on a loaded machine
        # may be seconds after the request: wait until the server has closed or reset its end
        # of every connection, then read what arrived
        deadline = time.monotonic() + SEND_TIMEOUT_S + 60
        while any(map(server_end_open, readers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for sock in readers:
            received, closed = read_until_closed(sock, 3.0)
            assert closed and received < len(full.content), f"{received} bytes, closed={closed}"
    finally:
        for sock in readers:
            sock.close()
    assert_healthy(net_service)


class HostileServer:
    """An HTTP server on FETCH_HOST: /bomb answers 1 GiB of zeros as `gzip, gzip` (a few KB on
    the wire); /drip sends a status line, then a header line every 0.3 s for 30 s. It records
    when each drip connection was closed by its client."""

    def __init__(self) -> None:
        zeros = zlib.compressobj(wbits=31)
        inner = b"".join(zeros.compress(bytes(MIB)) for _ in range(1024)) + zeros.flush()
        self.bomb = gzip.compress(inner)
        self.drips_closed: list[float] = []
        self.listener = socket.create_server((FETCH_HOST, 0))
        self.base = f"http://{FETCH_HOST}:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            request = conn.recv(65536)
            if request.startswith(b"GET /bomb "):
                head = "HTTP/1.1 200 OK\r\nContent-Encoding: gzip, gzip\r\n"
                head += f"Content-Length: {len(self.bomb)}\r\n\r\n"
                conn.sendall(head.encode() + self.bomb)
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for _ in range(100):
                time.sleep(0.3)
                try:
                    conn.sendall(b"X-Drip: 1\r\n")
                except OSError:
                    break
            self.drips_closed.append(time.monotonic())

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    yield server
    server.close()


def test_an_image_url_bomb_is_refused_at_the_byte_limit(
    net_service: str, hostile: HostileServer
) -> None:
    """1 GiB of zeros in two gzip layers (a few KB on the wire): 413, and memory stays put."""
    assert len(hostile.bomb) < 10_000
    baseline = rss_bytes(net_service)
    body = {"image_url": f"{hostile.base}/bomb"}
    error = attack_and_check(
        net_service, lambda: post(net_service, "/knn-service", json=body), 413, "too_large"
    )
    assert "over the limit" in str(error["error"])
    assert rss_bytes(net_service) - baseline < 100 * MIB


def test_a_header_drip_is_cut_at_the_deadline_and_holds_nothing(
    net_service: str, hostile: HostileServer
) -> None:
    """20 image_urls whose server drips its headers: each answered 400 at the deadline, and the
    service closes every socket then — its threads and open files are back where they were."""
    pid = service_pid(net_service)
    post(net_service, "/knn-service", json={"image_url": f"{hostile.base}/drip"})  # warm up
    time.sleep(1.0)
    threads_before, fds_before = threads_and_fds(pid)
    hostile.drips_closed.clear()
    answers: list[tuple[httpx.Response, float]] = []
    limits = httpx.Limits(max_connections=20)
    with httpx.Client(base_url=net_service, timeout=30, limits=limits, trust_env=False) as client:

        def one() -> None:
            start = time.monotonic()
            response = client.post("/knn-service", json={"image_url": f"{hostile.base}/drip"})
            answers.append((response, time.monotonic() - start))

        concurrently(20, one, timeout_s=30)
    answered_at = time.monotonic()
    assert len(answers) == 20
    for response, elapsed_s in answers:
        assert_envelope(response, 400, "bad_request")
        assert elapsed_s < FETCH_TIMEOUT_S + 2.0, f"answered after {elapsed_s:.1f} s"
    deadline = answered_at + 3.0
    while len(hostile.drips_closed) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(hostile.drips_closed) == 20, f"{len(hostile.drips_closed)} of 20 sockets closed"
    threads, fds = threads_and_fds(pid)
    assert threads <= threads_before + 4, f"threads {threads_before} -> {threads}"
    assert fds <= fds_before + 4, f"open fds {fds_before} -> {fds}"
    assert_healthy(net_service)


def test_large_base64_bodies_leave_the_event_loop_free(net_service: str) -> None:
    """Two clients posting 30 MiB base64 bodies in a loop (each refused 413: over the upload
    limit): /health keeps answering quickly meanwhile."""
    big = json.dumps({"image": "A" * (30 * MIB), "k": 3}).encode()
    stop = threading.Event()
    statuses: list[int] = []

    def flood() -> None:
        with httpx.Client(base_url=net_service, timeout=60, trust_env=False) as client:
            while not stop.is_set():
                response = client.post(
                    "/search", content=big, headers={"Content-Type": "application/json"}
                )
                statuses.append(response.status_code)

    floods = [threading.Thread(target=flood) for _ in range(2)]
    for thread in floods:
        thread.start()
    latencies_s = []
    try:
        with httpx.Client(base_url=net_service, timeout=10, trust_env=False) as client:
            end = time.monotonic() + 6.0
            while time.monotonic() < end:
                start = time.monotonic()
                assert client.get("/health").status_code == 200
                latencies_s.append(time.monotonic() - start)
                time.sleep(0.02)
    finally:
        stop.set()
        for thread in floods:
            thread.join(60)
    assert statuses and set(statuses) == {413}, sorted(set(statuses))
    latencies_s.sort()
    p50_s, p90_s = latencies_s[len(latencies_s) // 2], latencies_s[len(latencies_s) * 9 // 10]
    print(f"/health p50 {p50_s * 1000:.1f} ms, p90 {p90_s * 1000:.1f} ms, {len(statuses)} floods")
    assert p50_s < 0.05 and p90_s < 0.5, f"/health p50 {p50_s:.3f} s, p90 {p90_s:.3f} s"


# --- container formats and decode flood ---

ACCEPTED = "JPEG, PNG, WebP, GIF or BMP"  # what a refused format's 415 names


def ico_wrapping(image_png: bytes) -> bytes:
    """An ICO whose directory says 16 x 16 around `image_png`, as a hostile client writes one.

    Pillow writes the container (header + one directory entry); the entry's PNG is swapped for
    the large one and its byte count fixed: the directory still says 16 x 16.
    """
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, format="ICO", sizes=[(16, 16)])
    small = out.getvalue()
    header, entry = small[:6], bytearray(small[6:22])
    struct.pack_into("<II", entry, 8, len(image_png), 22)  # bytes in resource, offset
    return header + bytes(entry) + image_png


@pytest.fixture(scope="module")
def ico_bomb() -> bytes:
    return ico_wrapping(black_png(7000, 7000, color_type=2))  # ~140 KB, 49 M pixels inside


def test_an_ico_around_a_large_png_is_refused_before_anything_is_decoded(
    service: Fixture, ico_bomb: bytes
) -> None:
    def attack() -> httpx.Response:
        return post(service.base, "/search", files={"image": ("x.ico", ico_bomb, "image/x-icon")})

    body, growth = peak_rss_growth(
        service.base, lambda: attack_and_check(service.base, attack, 415, "not_an_image")
    )
    assert ACCEPTED in str(body["error"])
    assert growth < 100 * MIB, f"RSS grew {growth / MIB:.0f} MiB"


def test_concurrent_ico_bombs_cost_no_memory(service: Fixture, ico_bomb: bytes) -> None:
    body = {"images": [b64(ico_bomb)] * 2}

    def attack() -> list[tuple[int, float]]:
        answers: list[tuple[int, float]] = []

        def one() -> None:
            start = time.monotonic()
            status = post(service.base, "/embed", json=body).status_code
            answers.append((status, time.monotonic() - start))

        concurrently(6, one)
        return answers

    answers, growth = peak_rss_growth(service.base, attack)
    assert [status for status, _ in answers] == [415] * 6
    assert max(seconds for _, seconds in answers) < QUICK_S
    assert growth < 150 * MIB, f"RSS grew {growth / MIB:.0f} MiB"
    assert_healthy(service.base)


def pillow_file(fmt: str, frames: int = 1, **options: object) -> bytes:
    images = [Image.new("RGB", (64, 64), (40 * i, 90, 200)) for i in range(frames)]
    out = io.BytesIO()
    extra = {"save_all": True, "append_images": images[1:]} if frames > 1 else {}
    images[0].save(out, format=fmt, **extra, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "frames"),
    [("ICO", 1), ("ICNS", 1), ("TIFF", 3), ("PPM", 1), ("TGA", 1), ("PCX", 1), ("SGI", 1)],
    ids=["ico", "icns", "tiff-3-pages", "ppm", "tga", "pcx", "sgi"],
)
def test_formats_outside_the_accepted_list_get_415_naming_it(
    service: Fixture, fmt: str, frames: int
) -> None:
    data = pillow_file(fmt, frames)
    response = post(service.base, "/search", files={"image": ("x", data, "application/x")})
    body = assert_envelope(response, 415, "not_an_image")
    assert ACCEPTED in str(body["error"])


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("GIF", {"duration": 50}), ("PNG", {"duration": 50}), ("WEBP", {"lossless": True})],
    ids=["animated-gif", "apng", "animated-webp"],
)
def test_animated_images_are_searched_by_their_first_frame(
    service: Fixture, fmt: str, options: dict[str, object]
) -> None:
    animated = pillow_file(fmt, 12, **options)
    first = pillow_file(fmt, 1, **{k: v for k, v in options.items() if k != "duration"})
    answers = [
        post(service.base, "/embed", json={"images": [b64(data)]}) for data in (animated, first)
    ]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    vectors = [a.json()["image_embeddings"][0] for a in answers]
    assert vectors[0] == pytest.approx(vectors[1], abs=1e-5)


FLOOD_CLIENTS = 16
FLOOD_S = 3.0
FLOOD_ANSWER_BOUND_S = 30.0  # a flood request admitted waits at most the decode budget's worth


def test_a_decode_flood_gets_429_and_small_image_searches_keep_their_latency(
    service: Fixture, big_png: bytes
) -> None:
    """16 clients loop /embed with three 36 M-pixel PNGs (a few KB each) for 3 s while one
    client times small image searches: those stay fast, the flood gets 429 or a bounded wait."""
    small = {"image": b64(png(24)), "k": 3}
    flood_body = {"images": [b64(big_png)] * 3}
    unloaded = [timed_post(service.base, "/search", small) for _ in range(5)]
    stop = threading.Event()
    flood: list[tuple[int, float, str | None]] = []
    searches: list[tuple[int, float]] = []

    def flooder() -> None:
        while not stop.is_set():
            status, seconds, retry_after = timed_post(service.base, "/embed", flood_body)
            flood.append((status, seconds, retry_after))
            if status == 429:  # the clients share this machine's 2 cores with the server:
                time.sleep(0.2)  # resending 400 KB bodies at once would measure their CPU

    def searcher() -> None:
        time.sleep(0.5)  # the flood is under way
        while not stop.is_set():
            status, seconds, _ = timed_post(service.base, "/search", small)
            searches.append((status, seconds))

    threads = [threading.Thread(target=flooder) for _ in range(FLOOD_CLIENTS)]
    threads.append(threading.Thread(target=searcher))
    for thread in threads:
        thread.start()
    time.sleep(FLOOD_S)
    stop.set()
    for thread in threads:
        thread.join(FLOOD_ANSWER_BOUND_S + 10)
    assert not any(thread.is_alive() for thread in threads), "a client is still waiting"
    latencies = sorted(seconds for _, seconds in searches)
    p50 = latencies[len(latencies) // 2]
    baseline = sorted(seconds for _, seconds, _ in unloaded)[2]
    assert {status for status, _ in searches} == {200}
    assert p50 < max(1.0, 20 * baseline), f"small searches p50 {p50:.2f} s under the flood"
    assert {status for status, _, _ in flood} <= {200, 429}
    refused = [(seconds, retry) for status, seconds, retry in flood if status == 429]
    assert refused, "the flood was never refused: the decode budget did not engage"
    assert all(retry is not None for _, retry in refused)
    assert max(seconds for seconds, _ in refused) < QUICK_S
    assert max(seconds for _, seconds, _ in flood) < FLOOD_ANSWER_BOUND_S
    assert_healthy(service.base)


def timed_post(base: str, path: str, body: dict[str, object]) -> tuple[int, float, str | None]:
    """Status, seconds and Retry-After of one POST."""
    start = time.monotonic()
    response = post(base, path, json=body)
    return response.status_code, time.monotonic() - start, response.headers.get("Retry-After")


# --- tokenizer cost and abandoned work ---


def letters(count: int, rng: random.Random) -> str:
    """`count` random letters: one word that byte-pair encoding finds costly."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(count))


def answered_quickly(base: str, attack: Callable[[], httpx.Response]) -> httpx.Response:
    """The attack is answered (200 or a 4xx) within QUICK_S while every valid search gets 200,
    memory stays bounded and the server is healthy afterwards."""
    baseline = rss_bytes(base)
    response, elapsed, statuses = under_attack(base, attack)
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    assert elapsed < QUICK_S, f"the attack took {elapsed:.1f} s"
    assert statuses and set(statuses) == {200}, f"valid requests got {sorted(set(statuses))}"
    assert rss_bytes(base) - baseline < RSS_GROWTH_BOUND
    assert_healthy(base)
    return response


def test_classify_with_500_label_slots_in_a_template_is_answered_quickly(service: Fixture) -> None:
    """8 labels of 1,000 letters in "{}" x 500 (11.5 KB) made 500 KB prompts, tokenized whole on
    the encoder thread: every search waited minutes."""
    rng = random.Random(22)
    labels = [letters(1000, rng) for _ in range(8)]
    body = {"images": [b64(png(24))], "labels": labels, "templates": ["{}" * 500]}
    response = answered_quickly(service.base, lambda: post(service.base, "/classify", json=body))
    assert response.status_code == 200
    assert sorted(p["label"] for p in response.json()["predictions"]) == sorted(labels)


def test_embed_of_32_long_words_is_answered_quickly(service: Fixture) -> None:
    """32 texts of one 1,000-letter word each: ~0.1-0.3 s of byte-pair encoding apiece before."""
    rng = random.Random(23)
    body = {"texts": [letters(1000, rng) for _ in range(32)]}
    response = answered_quickly(service.base, lambda: post(service.base, "/embed", json=body))
    assert response.status_code == 200 and len(response.json()["text_embeddings"]) == 32


def test_classify_of_256_long_labels_in_500_slots_keeps_memory_bounded(service: Fixture) -> None:
    """256 labels of 1,000 letters in "{}" x 500 (261 KB) expanded to 128 MB of prompts, and
    their tokenizing took hundreds of MB more; each prompt is now cut at the tokenizer's budget."""
    rng = random.Random(24)
    body = {
        "images": [b64(png(24))],
        "labels": [letters(1000, rng) for _ in range(256)],
        "templates": ["{}" * 500],
    }
    outcome, growth = peak_rss_growth(
        service.base,
        lambda: under_attack(service.base, lambda: post(service.base, "/classify", json=body)),
    )
    response, elapsed, statuses = outcome
    assert isinstance(response, httpx.Response) and response.status_code == 200, response
    assert elapsed < 60, f"the /classify took {elapsed:.1f} s"
    assert statuses and set(statuses) == {200}
    assert growth < 100 * MIB, f"peak +{growth / MIB:.0f} MiB"
    assert_healthy(service.base)


def test_embeds_of_unique_words_leave_memory_bounded(service: Fixture) -> None:
    """200 /embed of 32 texts of ~110 unique words each: the tokenizer's word cache kept every
    word (+130 MB here); now it is an LRU, and words past the context are not encoded."""
    rng = random.Random(25)
    bodies = [
        {"texts": [" ".join(letters(8, rng) for _ in range(110)) for _ in range(32)]}
        for _ in range(200)
    ]
    baseline = rss_bytes(service.base)
    statuses: list[int] = []

    def send(part: list[dict[str, object]]) -> None:
        with httpx.Client(base_url=service.base, timeout=60, trust_env=False) as client:
            statuses.extend(client.post("/embed", json=body).status_code for body in part)

    senders = [threading.Thread(target=send, args=(bodies[i::4],)) for i in range(4)]
    start = time.monotonic()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)
    assert statuses == [200] * len(bodies)
    assert time.monotonic() - start < 60
    assert rss_bytes(service.base) - baseline < 80 * MIB
    assert_healthy(service.base)


def metric(base: str, name: str, labels: str) -> float:
    """A sample of /metrics (0 if absent): `name{labels}`."""
    metrics = httpx.get(f"{base}/metrics", timeout=10, trust_env=False).text
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


def heavy_classify(seed: int) -> bytes:
    """A /classify of 2,048 prompts (the budget) whose every prompt is a new 1,000-letter word:
    a few seconds of tokenizing and encoding that no cache shortens."""
    rng = random.Random(seed)
    labels = [letters(1000, rng) for _ in range(256)]
    templates = [letters(3, rng) + "{}" for _ in range(8)]  # glued on: a new word per prompt
    body = json.dumps({"images": [b64(png(24))], "labels": labels, "templates": templates})
    head = "POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode()


def wait_for_text_batches(base: str, count: float, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while text_batches(base) < count:
        assert time.monotonic() < deadline, f"fewer than {count} text batches in {timeout_s} s"
        time.sleep(0.02)


def test_a_classify_whose_client_leaves_stops_encoding(service: Fixture) -> None:
    """The client of a long /classify disconnects: its remaining prompt chunks are not encoded
    (it went on for 19 s), and it is counted as 499, not as a server error."""
    before = text_batches(service.base)
    labels = 'method="POST",route="/classify",status="499"'
    counted = metric(service.base, "duet_http_requests_total", labels)
    host, port = service.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(heavy_classify(26))
        wait_for_text_batches(service.base, before + 2)  # its encoding has started
    time.sleep(1.0)  # the disconnect is seen; a chunk already on its way may still finish
    stopped_at = text_batches(service.base)
    time.sleep(2.0)
    assert text_batches(service.base) == stopped_at, "chunks were encoded after the client left"
    assert stopped_at - before < 2048 / 8 / 2  # far fewer than its 256 chunks
    assert metric(service.base, "duet_http_requests_total", labels) == counted + 1
    assert_healthy(service.base)


def test_sigterm_with_heavy_work_in_flight_exits_within_the_shutdown_timeout(
    tmp_path: Path,
) -> None:
    """Three long /classify in flight: SIGTERM stops the server within DUET_SHUTDOWN_TIMEOUT_S
    (and exiting), instead of waiting for them; their clients get 503 not_ready."""
    artifact = make_artifact(tmp_path)
    index = make_index(artifact, make_shard(tmp_path / "synth", 8), tmp_path / "index")
    env = {"DUET_SHUTDOWN_TIMEOUT_S": "1", "DUET_ACCESS_LOG": "false"}
    with served_process(artifact, index, env) as (base, process):
        host, port = base.removeprefix("http://").split(":")
        answers: list[bytes] = []

        def client(seed: int) -> None:
            with socket.create_connection((host, int(port)), timeout=60) as sock:
                sock.sendall(heavy_classify(seed))
                answer = b""
                with contextlib.suppress(ConnectionError):  # what arrived before a reset counts
                    while chunk := sock.recv(65536):  # head and body may come apart; then close
                        answer += chunk
                answers.append(answer)

        clients = [threading.Thread(target=client, args=(seed,)) for seed in (27, 28, 29)]
        for thread in clients:
            thread.start()
        wait_for_text_batches(base, 3)
        start = time.monotonic()
        process.terminate()
        process.wait(timeout=60)
        exited_s = time.monotonic() - start
        for thread in clients:
            thread.join(60)
    assert exited_s < 1 + 4, f"the server took {exited_s:.1f} s to exit after SIGTERM"
    assert len(answers) == 3
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b'"type":"not_ready"' in answer


@contextlib.contextmanager
def served_process(
    artifact: Path, index: Path, env: dict[str, str]
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`python -m serve` on a free port, ready; its base URL and process (killed at the end)."""
    port = free_port()
    settings = {**env, "DUET_PORT": str(port), "DUET_LOG_LEVEL": "warning"}
    settings.update(DUET_ARTIFACT_DIR=str(artifact), DUET_INDEX_DIR=str(index))
    process = subprocess.Popen(
        [sys.executable, "-m", "serve"], env=subprocess_env(**settings), text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/ready", timeout=5, trust_env=False).status_code == 200:
                    break
            time.sleep(0.3)
        assert process.poll() is None, "the server exited while starting"
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
