"""Resident memory of the retrieval service per runtime, after start-up and a few requests.

    python bench/serve_memory.py [--models duet-tiny,ViT-B-32] [--runtimes torch,onnx,onnx-int8]
                                 [--vectors 1000] [--before DIR]

For each model (an open_clip name, random weights: they cost what trained ones do; or an
artifact directory), builds an artifact with ONNX towers (fp32 and int8) and an index of
`--vectors` random unit vectors (`serve_load.build`), then per runtime starts `python -m serve`,
waits until ready, sends 20 text searches and 5 image searches, and reads the server's resident
set (VmRSS), the part of it that is the process's own (RssAnon: the rest is mapped file pages,
which the kernel can drop) and the peak resident set (VmHWM) from /proc, and the peak of
RssAnon while it starts (polled every 10 ms). Prints one table row per model and runtime.
`--before DIR` measures the same runtimes in another checkout of the project too (e.g.
`git archive main | tar -x -C DIR`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import os
import sys
import tempfile
import threading
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import HOST, REPO_ROOT, K, build, queries, start_server  # noqa: E402

from common.onnx_towers import export_onnx  # noqa: E402
from tests.serve_support import png  # noqa: E402


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon and VmHWM of process `pid`, in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "RssAnon", "VmHWM")}


class AnonymousPeak(threading.Thread):
    """The largest RssAnon of this process's children, polled every 10 ms until stopped: the
    kernel keeps the peak of the whole resident set (VmHWM), mapped file pages included, but
    no peak of the process's own memory."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        children = Path(f"/proc/{os.getpid()}/task/{threading.main_thread().native_id}/children")
        while not self.done.wait(0.01):
            for pid in children.read_text().split():
                with contextlib.suppress(OSError, KeyError, ValueError):
                    self.peak_mib = max(self.peak_mib, memory_mib(int(pid))["RssAnon"])


def measure(artifact: Path, index: Path, runtime: str, root: Path = REPO_ROOT) -> dict[str, float]:
    """The memory of a server of checkout `root` after start-up and a few searches on `runtime`."""
    peak = AnonymousPeak()
    peak.start()
    try:
        proc, port = start_server(artifact, index, True, env={"DUET_RUNTIME": runtime}, root=root)
    finally:
        peak.done.set()
        peak.join()
    try:
        image = base64.b64encode(png(320)).decode()
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=60, trust_env=False) as http:
            assert http.get("/ready").json().get("runtime", runtime) == runtime
            for text in queries(20, seed=3):
                http.post("/search", json={"text": text, "k": K}).raise_for_status()
            for _ in range(5):
                http.post("/search", json={"image": image, "k": K}).raise_for_status()
        return {**memory_mib(proc.pid), "peak RssAnon": peak.peak_mib}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="duet-tiny,ViT-B-32")
    parser.add_argument("--runtimes", default="torch,onnx,onnx-int8")
    parser.add_argument("--vectors", type=int, default=1000)
    parser.add_argument("--before", type=Path, help="another checkout, measured too")
    args = parser.parse_args()
    checkouts = {"this": REPO_ROOT, **({"before": args.before} if args.before else {})}
    print(
        "| model | checkout | runtime | resident MiB | of which anonymous "
        "| peak MiB | peak anonymous MiB |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            artifact, index = build(Path(tmp), model, args.vectors, "flat")
            if not (artifact / "onnx" / "text.int8.onnx").is_file():
                export_onnx(artifact, int8=True)
            for runtime, (name, root) in itertools.product(
                args.runtimes.split(","), checkouts.items()
            ):
                mib = measure(artifact, index, runtime, root)
                columns = ("VmRSS", "RssAnon", "VmHWM", "peak RssAnon")
                sizes = " | ".join(f"{mib[k]:.0f}" for k in columns)
                print(f"| {model} | {name} | {runtime} | {sizes} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
