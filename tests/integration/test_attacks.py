"""The running service under attack: each costly or malformed request is refused quickly with the
error envelope while concurrent valid requests all succeed, memory stays bounded, and the server
is healthy afterwards.

One `python -m serve` (duet-micro, 32-pixel inputs) on a loopback port serves the whole module;
attacks and valid traffic go only to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

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

pytestmark = pytest.mark.slow

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
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as client:
        return client.post(path, **kwargs)  # type: ignore[arg-type]


def rss_bytes(base: str) -> int:
    metrics = httpx.get(f"{base}/metrics", timeout=10, trust_env=False).text
    found = re.search(r"^process_resident_memory_bytes (\S+)$", metrics, re.MULTILINE)
    assert found, "no process_resident_memory_bytes in /metrics"
    return int(float(found.group(1)))


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
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak.append(rss_bytes(service.base))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answers: list[httpx.Response] = []
        posts = [
            threading.Thread(
                target=lambda: answers.append(post(service.base, "/classify", json=body))
            )
            for _ in range(2)
        ]
        for thread in posts:
            thread.start()
        for thread in posts:
            thread.join(120)
    finally:
        done.set()
        sampler.join()
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["predictions"][0]["label"] in ("black", "white")
    assert max(peak) - baseline < RSS_GROWTH_BOUND, f"peak {(max(peak) - baseline) / MIB:.0f} MiB"
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
    baseline = rss_bytes(service.base)
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak.append(rss_bytes(service.base))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response, elapsed, statuses = under_attack(
            service.base, lambda: post(service.base, "/classify", json=body)
        )
    finally:
        done.set()
        sampler.join()
    assert isinstance(response, httpx.Response) and response.status_code == 200, response
    assert elapsed < 60, f"the /classify took {elapsed:.1f} s"
    assert statuses and set(statuses) == {200}
    assert max(peak) - baseline < 100 * MIB, f"peak +{(max(peak) - baseline) / MIB:.0f} MiB"
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
                answers.append(sock.recv(65536))

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
