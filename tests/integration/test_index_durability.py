"""Acknowledged means durable: a writer killed with SIGKILL at random moments (mid-journal-write,
mid-compaction) loses no acknowledged update and never leaves half of one.

A child process adds and deletes items in a loop, compacting now and then, and prints each
update's ids once `add`/`delete` has returned. The parent kills it at random moments, starts it
again on the same index, and in the end compares the index with an exact rebuild from the
acknowledged history: every acknowledged add is there unless acknowledged deleted, and an
update in flight at a kill is there entirely or not at all.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve.indexing.index import SearchIndex, write_index
from tests.conftest import REPO_ROOT, free_port, subprocess_env
from tests.serve_support import make_artifact

pytestmark = pytest.mark.slow

DIM = 8
BATCH = 3

# Item id i always has the same vector, so the parent can rebuild the expected index.
WRITER = f"""
import sys
import numpy as np
from serve.indexing.index import IndexRow, SearchIndex

def vector(i):
    v = np.random.default_rng(i).standard_normal({DIM}).astype(np.float32)
    return v / np.linalg.norm(v)

index = SearchIndex.load(sys.argv[1], writable=True)
rng = np.random.default_rng(int(sys.argv[2]))
print("ready", flush=True)
step = 0
while True:
    step += 1
    first = index._items.next_id
    ids = list(range(first, first + {BATCH}))
    print("adding", *ids, flush=True)
    rows = [IndexRow(f"k{{i}}", "c", {{}}) for i in ids]
    got = index.add(np.stack([vector(i) for i in ids]), rows)
    print("added", *got, flush=True)
    live = sorted(index.rows(range(index._items.next_id)))
    doomed = [int(i) for i in rng.choice(live, 2, replace=False)]
    print("deleting", *doomed, flush=True)
    index.delete(doomed)
    print("deleted", *doomed, flush=True)
    if step % 3 == 0:
        print("compacting", flush=True)
        index.compact()
"""


def vector(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_kill_9_in_a_loop_loses_no_acknowledged_update(tmp_path: Path):
    out = tmp_path / "index"
    write_index(
        out, np.stack([vector(i) for i in range(20)]), [(f"k{i}", "c", {}) for i in range(20)]
    )
    acked_live = set(range(20))
    in_flight: list[tuple[str, set[int]]] = []  # the update each kill interrupted
    rng = random.Random(0)
    for round_ in range(12):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(out), str(round_)],
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        # kill inside an update or a compaction: just after the child says it starts one
        trigger, count = rng.choice(["adding", "deleting", "compacting"]), rng.randint(1, 4)
        pending: tuple[str, set[int]] | None = None
        while count:
            word, *ids = child.stdout.readline().split()
            if word in ("adding", "deleting"):
                pending = (word, {int(i) for i in ids})
            elif word == "added":
                acked_live |= {int(i) for i in ids}
                pending = None
            elif word == "deleted":
                acked_live -= {int(i) for i in ids}
                pending = None
            count -= word == trigger
        time.sleep(rng.uniform(0, 0.004 if trigger != "compacting" else 0.05))
        child.kill()
        child.wait()
        rest = child.stdout.read().split("\n")  # acknowledgements printed before the kill
        for line in rest:
            word, *ids = line.split() or [""]
            if word == "added":
                acked_live |= {int(i) for i in ids}
                pending = None
            elif word == "deleted":
                acked_live -= {int(i) for i in ids}
                pending = None
            elif word in ("adding", "deleting"):
                pending = (word, {int(i) for i in ids})
        index = SearchIndex.load(out, writable=False)
        live = set(index.rows(range(index._items.next_id)))
        index.close()
        if pending is not None:  # the interrupted update: all of it or none of it
            word, ids = pending
            applied = ids <= live if word == "adding" else not ids & live
            untouched = not ids & live if word == "adding" else ids <= live
            assert applied or untouched, (word, ids, live & ids)
            if word == "adding" and applied:
                acked_live |= ids
            if word == "deleting" and applied:
                acked_live -= ids
            in_flight.append(pending)
        extra, lost = sorted(live - acked_live), sorted(acked_live - live)
        assert live == acked_live, (round_, extra, lost, pending)

    index = SearchIndex.load(out)
    ids = sorted(acked_live)
    queries = np.stack([vector(10_000 + i) for i in range(10)])
    vectors = np.stack([vector(i) for i in ids])
    expected = np.array(ids)[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :5]]
    assert [[h.id for h in q] for q in index.search(queries, 5)] == expected.tolist()
    index.close()
    assert len(acked_live) > 20


def service_vector(n: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(50_000 + n).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def start_service(artifact: Path, index: Path) -> tuple[subprocess.Popen, str]:
    """`python -m serve` on a free loopback port, once /ready; killed by the caller."""
    port = free_port()
    env = subprocess_env(
        DUET_ARTIFACT_DIR=str(artifact), DUET_INDEX_DIR=str(index), DUET_PORT=str(port)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve"], cwd=REPO_ROOT, env=env, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=base, timeout=5, trust_env=False) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the service exited while loading"
            try:
                if client.get("/ready").status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the service did not become ready")


def test_a_live_service_killed_in_a_loop_loses_no_acknowledged_update(tmp_path: Path):
    """The same against `python -m serve`: adds (by embedding), batch deletes and compactions
    over HTTP, the server SIGKILLed at a random moment each round, then restarted."""
    artifact = make_artifact(tmp_path)
    dim = 64  # duet-micro
    out = tmp_path / "index"
    base_rows = [(f"s{i}", "", {}) for i in range(10)]
    write_index(out, np.stack([service_vector(-i - 1, dim) for i in range(10)]), base_rows)
    acked: dict[str, int] = {f"s{i}": i for i in range(10)}  # key -> id, acknowledged live
    vectors = {f"s{i}": service_vector(-i - 1, dim) for i in range(10)}
    rng = random.Random(1)
    n = 0
    for round_ in range(3):
        proc, base = start_service(artifact, out)
        killer = threading.Timer(rng.uniform(0.2, 1.0), proc.kill)
        killer.start()
        pending: tuple[str, list[str]] | None = None
        with httpx.Client(base_url=base, timeout=10, trust_env=False) as client:
            try:
                while True:
                    keys = [f"r{round_}-{n}-{j}" for j in range(3)]
                    n += 1
                    for j, key in enumerate(keys):
                        vectors[key] = service_vector(n * 10 + j, dim)
                    pending = ("add", keys)
                    items = [{"embedding": vectors[key].tolist(), "key": key} for key in keys]
                    answer = client.post("/indices/default/items", json={"items": items})
                    assert answer.status_code == 200, answer.text
                    acked.update(zip(keys, answer.json()["ids"], strict=True))
                    doomed = rng.sample(sorted(acked), 2)
                    pending = ("delete", doomed)
                    answer = client.post(
                        "/indices/default/items/delete", json={"ids": [acked[k] for k in doomed]}
                    )
                    assert answer.status_code == 200, answer.text
                    for key in doomed:
                        del acked[key]
                    pending = None
                    if n % 4 == 0:
                        assert client.post("/indices/default/compact").status_code == 200
            except httpx.TransportError:
                pass  # killed
        killer.join()
        proc.wait()
        index = SearchIndex.load(out, writable=False)
        live = {row.key: i for i, row in index.rows(range(index._items.next_id)).items()}
        index.close()
        if pending is not None:  # the request the kill cut off: all of it or none
            op, keys = pending
            present = [key in live for key in keys]
            assert all(present) or not any(present), (op, keys, present)
            if op == "add" and all(present):
                acked.update({key: live[key] for key in keys})
            if op == "delete" and not any(present):
                for key in keys:
                    del acked[key]
        assert live == acked, (round_, sorted(live.keys() ^ acked.keys()))

    index = SearchIndex.load(out)
    keys = sorted(acked)
    queries = np.stack([service_vector(90_000 + i, dim) for i in range(5)])
    matrix = np.stack([vectors[key] for key in keys])
    top = np.argsort(-(queries @ matrix.T), axis=1, kind="stable")[:, :5]
    expected = [[acked[keys[j]] for j in row] for row in top]
    assert [[h.id for h in q] for q in index.search(queries, 5)] == expected
    index.close()
