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
import time
from pathlib import Path

import numpy as np

from serve.indexing.index import SearchIndex, write_index
from tests.conftest import REPO_ROOT, subprocess_env

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
        assert live == acked_live, (round_, sorted(live ^ acked_live))

    index = SearchIndex.load(out)
    ids = sorted(acked_live)
    queries = np.stack([vector(10_000 + i) for i in range(10)])
    vectors = np.stack([vector(i) for i in ids])
    expected = np.array(ids)[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :5]]
    assert [[h.id for h in q] for q in index.search(queries, 5)] == expected.tolist()
    index.close()
    assert len(acked_live) > 20
