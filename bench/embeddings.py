"""Latency of POST /v1/embeddings for 1 and 32 texts, per runtime (and per checkout, or beside
infinity_emb).

    python bench/embeddings.py [--model ViT-B-32|ARTIFACT_DIR] [--runtimes auto,torch]
                               [--batches 1,32] [--repeats 15] [--before DIR]
                               [--infinity-cmd PATH --infinity-model FOLDER | --infinity URL]
    python bench/embeddings.py --write-clip-folder DIR      # set-up for --infinity-cmd

Builds a random-init artifact of `--model` (random weights cost what trained ones do) or uses the
artifact directory it names, and a small index, starts `python -m serve` per runtime (and, with
`--before DIR`, the same from another checkout of the project, e.g. `git archive main | tar -x
-C DIR`, on torch: the service as it was), and posts the same /v1/embeddings requests to each,
one at a time, servers interleaved request by request so that the machine's drift hits all
alike. Two kinds of batch: `queries` (the search benchmark's 8-12-token queries) and `mixed`
(the same with every 8th text a 74-token sentence: one long text used to make the whole batch
run at its length). Prints the median wall ms per request and the median `x-inference-time`
(the forward passes) per server, kind and batch size.

Beside infinity_emb (an embedding server of its own, in a virtual environment of its own, e.g.
`python -m venv /tmp/inf && /tmp/inf/bin/pip install "infinity-emb[server,torch,vision]"`):
`--write-clip-folder DIR` writes DIR/transformers, a transformers CLIPModel of ViT-B-32's shapes
(transformers' CLIPConfig defaults, those of openai/clip-vit-base-patch32) with random weights,
OpenAI's BPE tokenizer (open_clip's copy) and image processor, and DIR/artifact, the same weights
exported by `common.export` with their ONNX towers: nothing is downloaded. Then `--model
DIR/artifact --infinity-cmd /tmp/inf/bin/infinity_emb --infinity-model DIR/transformers` starts
`infinity_emb v2` on the folder (CPU, its torch engine, offline) and joins it to the interleaved
requests at its POST /embeddings (`--infinity URL`: one already running, of the same weights).
Before timing, both embed the same texts: the queries' cosine must be >= 0.999 (infinity cuts
texts at 20 tokens, see `agreement_of`: the long ones differ, and a `mixed` batch costs it less).
Prints infinity's ms over each server's, per kind and batch ("x infinity", above 1: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import HOST, build, free_port, queries, start_server  # noqa: E402

LONG = "a photograph of " + " and ".join(f"a {c} shape" for c in range(16))  # 74 tokens
MIN_COSINE = 0.999  # infinity's and Duet's embeddings of the same texts, same weights


@dataclass(frozen=True, slots=True)
class Target:
    """One server under test: where to post, and the model name its requests carry."""

    client: httpx.Client
    path: str  # /v1/embeddings (Duet) or /embeddings (infinity)
    model: str

    def embed(self, body: bytes) -> httpx.Response:
        response = self.client.post(
            self.path, content=body, headers={"Content-Type": "application/json"}
        )
        response.raise_for_status()
        return response

    def body(self, texts: list[str]) -> bytes:
        return json.dumps({"input": texts, "model": self.model}).encode()


def texts(kind: str, count: int) -> list[str]:
    base = queries(count, seed=5)
    if kind == "mixed":
        base = [LONG if i % 8 == 7 else text for i, text in enumerate(base)]
    return base


def main() -> int:
    args = parse_args()
    if args.write_clip_folder:
        write_clip_folder(args.write_clip_folder)
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-") as tmp:
        artifact, index = build(Path(tmp), args.model, 1000, "flat")
        procs, urls = start_servers(artifact, index, args)
        try:
            targets = connect(urls)
            agreement = agreement_of(targets) if "infinity" in targets else None
            rows = measure(targets, batches, args.repeats)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
    print_rows(rows, args, agreement)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--runtimes", default="auto,torch")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--before", type=Path, help="another checkout, served on torch")
    parser.add_argument("--infinity-cmd", help="the infinity_emb executable (its own venv)")
    parser.add_argument("--infinity-model", type=Path, help="the transformers folder it serves")
    parser.add_argument("--infinity", help="URL of a running infinity_emb of the same weights")
    parser.add_argument(
        "--write-clip-folder", type=Path, help="write DIR/transformers and DIR/artifact, exit"
    )
    args = parser.parse_args()
    if args.infinity_cmd and not args.infinity_model:
        parser.error("--infinity-cmd needs --infinity-model (the transformers folder)")
    return args


def start_servers(
    artifact: Path, index: Path, args: argparse.Namespace
) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """Every server under test, started and ready: (processes to stop, name -> base URL)."""
    procs, urls = [], {}
    try:
        for runtime in args.runtimes.split(","):
            proc, port = start_server(artifact, index, True, env={"DUET_RUNTIME": runtime})
            procs.append(proc)
            urls[runtime] = f"http://{HOST}:{port}"
        if args.before:
            env = {"DUET_RUNTIME": "torch"}
            proc, port = start_server(artifact, index, True, env=env, root=args.before)
            procs.append(proc)
            urls["before (torch)"] = f"http://{HOST}:{port}"
        if args.infinity_cmd:
            proc, urls["infinity"] = start_infinity(args.infinity_cmd, args.infinity_model)
            procs.append(proc)
        elif args.infinity:
            urls["infinity"] = args.infinity.rstrip("/")
    except BaseException:
        for proc in procs:
            proc.terminate()
        raise
    return procs, urls


def start_infinity(command: str, folder: Path) -> tuple[subprocess.Popen, str]:
    """`infinity_emb v2` serving `folder` on the CPU, offline, once its /models answers."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")
    env["INFINITY_ANONYMOUS_USAGE_STATS"] = "0"
    argv = [command, "v2", "--model-id", str(folder), "--host", HOST, "--port", str(port)]
    argv += ["--device", "cpu", "--engine", "torch", "--log-level", "warning"]
    proc = subprocess.Popen(argv, env=env)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"infinity_emb exited while loading ({proc.returncode})")
        try:
            if httpx.get(f"{url}/models", timeout=10, trust_env=False).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.terminate()
    raise TimeoutError("infinity_emb did not become ready")


def connect(urls: dict[str, str]) -> dict[str, Target]:
    """name -> Target, with the model name each server lists first."""
    targets = {}
    for name, url in urls.items():
        client = httpx.Client(base_url=url, timeout=300, trust_env=False)
        if name == "infinity":
            model = client.get("/models").json()["data"][0]["id"]
            targets[name] = Target(client, "/embeddings", model)
        else:
            model = client.get("/v1/models").json()["data"][0]["id"]
            targets[name] = Target(client, "/v1/embeddings", model)
    return targets


def agreement_of(targets: dict[str, Target]) -> dict[str, float]:
    """The lowest cosine between infinity's and each Duet server's embedding of the same text,
    for the queries and for the 74-token texts; raises if the queries' differ (the servers do
    not serve the same weights). infinity_emb 0.0.78 cuts a CLIP's texts at the model config's
    `max_length`, transformers 4's generic default of 20 tokens: its long texts differ."""
    batch = texts("mixed", 32)
    long_rows = np.array([text == LONG for text in batch])
    theirs = vectors(targets["infinity"].embed(targets["infinity"].body(batch)))
    lowest = {"queries": 1.0, "74-token texts": 1.0}
    for name, target in targets.items():
        if name != "infinity":
            cosine = (vectors(target.embed(target.body(batch))) * theirs).sum(axis=1)
            lowest["queries"] = min(lowest["queries"], float(cosine[~long_rows].min()))
            lowest["74-token texts"] = min(lowest["74-token texts"], float(cosine[long_rows].min()))
    if lowest["queries"] < MIN_COSINE:
        raise SystemExit(f"infinity's and Duet's embeddings differ: {lowest}")
    return lowest


def vectors(response: httpx.Response) -> np.ndarray:
    """An OpenAI-style embeddings answer -> its [N, D] rows in input order, L2-normalised."""
    rows = sorted(response.json()["data"], key=lambda item: item["index"])
    out = np.array([row["embedding"] for row in rows], dtype=np.float64)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def measure(
    targets: dict[str, Target], batches: list[int], repeats: int
) -> dict[tuple[str, str, int], tuple[float, float]]:
    """(server, kind, batch) -> (median wall ms, median x-inference-time ms)."""
    samples: dict[tuple[str, str, int], tuple[list[float], list[float]]] = {}
    try:
        for kind in ("queries", "mixed"):
            for batch in batches:
                bodies = {name: t.body(texts(kind, batch)) for name, t in targets.items()}
                for i in range(repeats + 2):  # 2 warm-up requests each
                    for name, target in targets.items():
                        r = target.embed(bodies[name])
                        if i >= 2:
                            wall, forward = samples.setdefault((name, kind, batch), ([], []))
                            wall.append(r.elapsed.total_seconds() * 1000)
                            forward.append(float(r.headers.get("x-inference-time", "nan")))
    finally:
        for target in targets.values():
            target.client.close()
    return {
        key: (statistics.median(wall), statistics.median(forward))
        for key, (wall, forward) in sorted(samples.items())
    }


def print_rows(
    rows: dict[tuple[str, str, int], tuple[float, float]],
    args: argparse.Namespace,
    agreement: dict[str, float] | None,
) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.model}, {args.repeats} requests per row, load average after: {load}\n")
    versus = " | x infinity" if agreement is not None else ""
    print(f"| server | texts | batch | ms per request (median) | forward ms (median){versus} |")
    print("|---|---|---:|---:|---:|" + ("---:|" if versus else ""))
    for (name, kind, batch), (wall, forward) in rows.items():
        line = f"| {name} | {kind} | {batch} | {wall:.1f} | {forward:.1f} |"
        if versus:
            line += f" {rows['infinity', kind, batch][0] / wall:.2f} |"
        print(line)
    if agreement is not None:
        cosines = ", ".join(f"{kind} {cosine:.6f}" for kind, cosine in agreement.items())
        print(f"- lowest cosine between infinity's and Duet's embeddings: {cosines}")


def write_clip_folder(root: Path) -> None:
    """root/transformers: a random transformers CLIPModel of ViT-B-32's shapes with OpenAI's BPE
    tokenizer; root/artifact: the same weights exported by `common.export`, with ONNX towers."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from common.export import export
    from common.hf_convert import open_clip_bpe
    from common.onnx_towers import export_onnx

    folder, artifact = root / "transformers", root / "artifact"
    vocab, merges = open_clip_bpe()
    pairs: list = [tuple(m.split()) for m in merges]  # tokenizers' BPE takes (left, right) pairs
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).eval().save_pretrained(folder)  # defaults: ViT-B/32's shapes
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # defaults: OpenAI's 224-pixel preprocessing
    summary = export(str(folder), artifact, name="ViT-B-32-random")
    export_onnx(artifact)
    print(f"wrote {folder} and {artifact} (max difference {summary['max_abs_difference']:.2g})")


if __name__ == "__main__":
    sys.exit(main())
