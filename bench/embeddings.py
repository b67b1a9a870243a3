"""Latency of POST /v1/embeddings for 1 and 32 texts, per runtime (and per checkout).

    python bench/embeddings.py [--model ViT-B-32|ARTIFACT_DIR] [--runtimes auto,torch]
                               [--batches 1,32] [--repeats 15] [--before DIR]

Builds a random-init artifact of `--model` (random weights cost what trained ones do) or uses the
artifact directory it names, and a small index, starts `python -m serve` per runtime (and, with
`--before DIR`, the same from another checkout of the project, e.g. `git archive main | tar -x
-C DIR`, on torch: the service as it was), and posts the same /v1/embeddings requests to each,
one at a time, servers interleaved request by request so that the machine's drift hits all
alike. Two kinds of batch: `queries` (the search benchmark's 8-12-token queries) and `mixed`
(the same with every 8th text a 74-token sentence: one long text used to make the whole batch
run at its length). Prints the median wall ms per request and the median `x-inference-time`
(the forward passes) per server, kind and batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import HOST, build, queries, start_server  # noqa: E402

LONG = "a photograph of " + " and ".join(f"a {c} shape" for c in range(16))  # 74 tokens


def texts(kind: str, count: int) -> list[str]:
    base = queries(count, seed=5)
    if kind == "mixed":
        base = [LONG if i % 8 == 7 else text for i, text in enumerate(base)]
    return base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--runtimes", default="auto,torch")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--before", type=Path, help="another checkout, served on torch")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-") as tmp:
        artifact, index = build(Path(tmp), args.model, 1000, "flat")
        servers = {
            r: start_server(artifact, index, True, env={"DUET_RUNTIME": r})
            for r in args.runtimes.split(",")
        }
        if args.before:
            env = {"DUET_RUNTIME": "torch"}
            servers["before (torch)"] = start_server(
                artifact, index, True, env=env, root=args.before
            )
        try:
            rows = measure({name: port for name, (_, port) in servers.items()}, batches, args)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    print(f"\n{args.model}, {args.repeats} requests per row, load average {os.getloadavg()}\n")
    print("| server | texts | batch | ms per request (median) | forward ms (median) |")
    print("|---|---|---:|---:|---:|")
    for (name, kind, batch), (wall, forward) in rows.items():
        print(f"| {name} | {kind} | {batch} | {wall:.1f} | {forward:.1f} |")
    return 0


def measure(
    ports: dict[str, int], batches: list[int], args: argparse.Namespace
) -> dict[tuple[str, str, int], tuple[float, float]]:
    """(server, kind, batch) -> (median wall ms, median x-inference-time ms)."""
    clients = {
        n: httpx.Client(base_url=f"http://{HOST}:{p}", timeout=120) for n, p in ports.items()
    }
    model = clients[next(iter(clients))].get("/v1/models").json()["data"][0]["id"]
    samples: dict[tuple[str, str, int], tuple[list[float], list[float]]] = {}
    try:
        for kind in ("queries", "mixed"):
            for batch in batches:
                body = json.dumps({"input": texts(kind, batch), "model": model})
                for i in range(args.repeats + 2):  # 2 warm-up requests each
                    for name, client in clients.items():
                        r = client.post("/v1/embeddings", content=body,
                                        headers={"Content-Type": "application/json"})  # fmt: skip
                        r.raise_for_status()
                        if i >= 2:
                            wall, forward = samples.setdefault((name, kind, batch), ([], []))
                            wall.append(r.elapsed.total_seconds() * 1000)
                            forward.append(float(r.headers.get("x-inference-time", "nan")))
    finally:
        for client in clients.values():
            client.close()
    return {
        key: (statistics.median(wall), statistics.median(forward))
        for key, (wall, forward) in sorted(samples.items())
    }


if __name__ == "__main__":
    sys.exit(main())
