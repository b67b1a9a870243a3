"""Benchmark the contrastive loss: plain vs tiled, forward + backward, time and peak memory.

    python bench/loss.py [--sizes 1024,4096,16384,32768,65536] [--dim 512] [--kind clip]
                         [--block-size 2048] [--timeout 600]

Each (N, implementation) point runs in a fresh subprocess with a timeout, so one bad point
cannot hang the run and each peak RSS is the point's own. Inputs: unit vectors [N, D] in float32,
pairs at cosine ~0.5, logit scale 1/0.07. Time is the median of 5 runs after a warm-up for
N <= 4096, one run above. Memory is the process's peak RSS and, in brackets, the part the loss
added to the RSS it started from (importing torch alone is ~0.54 GB here). A plain point whose
logits would not fit in the memory available now is skipped, not attempted.
Both implementations save their loss and gradients; "rel. error" is the worst
||tiled - plain|| / ||plain|| over the loss and the three gradients.
The machine's float32 matmul throughput is measured in the same run (on the tiled loss's block
shape and on 4096^3), and each point prints the fraction of it the loss achieves counting
6*N^2*D flops per forward + backward, and in brackets counting the 8*N^2*D that tiled executes
(its backward recomputes the logits).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from train.config import LossConfig  # noqa: E402
from train.loss import rank_loss  # noqa: E402

PLAIN_MATRICES = 5.0  # first guess of plain's peak in [N, N] float32 matrices


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _inputs(n: int, dim: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    # pairs at cosine ~0.5, unrelated samples at ~0 +- 1/sqrt(D), CLIP's initial scale 1/0.07
    noise = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    texts = F.normalize(images + math.sqrt(3) * noise, dim=-1)
    scale = torch.tensor(math.log(1 / 0.07))
    return [x.requires_grad_() for x in (images, texts, scale)]


def run_point(n: int, implementation: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Forward + backward of one loss in this process: seconds (median), peak RSS."""
    cfg = LossConfig(kind=args.kind, implementation=implementation, block_size=args.block_size)
    inputs = _inputs(n, args.dim)
    labels = torch.arange(n)
    baseline = _rss_bytes()

    def step() -> torch.Tensor:
        for x in inputs:
            x.grad = None
        loss = rank_loss(cfg, inputs[0], inputs[1], inputs[2], labels=labels)
        loss.backward()
        return loss

    repeats = 5 if n <= 4096 else 1
    if repeats > 1:
        step()  # warm-up: first-call overheads are not what small N is about
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"loss": loss.detach(), "grads": [x.grad for x in inputs]}, out)
    return {
        "seconds": sorted(seconds)[len(seconds) // 2],
        "peak_rss": peak,
        "baseline_rss": baseline,
    }


def run_matmul(args: argparse.Namespace) -> dict[str, Any]:
    """float32 matmul GFLOP/s: the tiled loss's block shape, and a large square."""
    results = {}
    shapes = {
        "block": (args.block_size, args.dim, args.block_size),
        "square": (4096, 4096, 4096),
    }
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        repeats = max(3, int(2e11 / (2 * m * k * n)))
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        results[name] = 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9
    return results


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(argv: list[str], timeout_s: float) -> dict[str, Any]:
    """Run this script with `argv` in a fresh process; its last stdout line is JSON."""
    try:
        proc = subprocess.run(
            [sys.executable, __file__, *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rel_error(a: Path, b: Path) -> float:
    """Worst ||a - b|| / ||b|| over the loss and the gradients saved by two points."""
    x, y = torch.load(a), torch.load(b)
    pairs = [(x["loss"], y["loss"]), *zip(x["grads"], y["grads"], strict=True)]
    return max(((p - q).norm() / q.norm()).item() for p, q in pairs)


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def measure(args: argparse.Namespace, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    common = ["--dim", str(args.dim), "--kind", args.kind, "--block-size", str(args.block_size)]
    matmul = _child(["--matmul", *common], args.timeout)
    rows = []
    matrices = PLAIN_MATRICES  # refined by each plain point: its loss memory / (N^2 floats)
    for n in args.sizes:
        row: dict[str, Any] = {"n": n}
        for impl in ("plain", "tiled"):
            need = matrices * n * n * 4
            if impl == "plain" and need > 0.8 * _available_bytes():
                row[impl] = {"error": f"skipped: needs ~{_gb(need)}"}
                continue
            out = tmp / f"{n}-{impl}.pt"
            row[impl] = _child(["--point", str(n), impl, str(out), *common], args.timeout)
            row[impl]["out"] = out
            print(f"N={n} {impl}: {row[impl]}", file=sys.stderr, flush=True)
            if impl == "plain" and "seconds" in row[impl] and n >= 4096:
                loss_memory = row[impl]["peak_rss"] - row[impl]["baseline_rss"]
                matrices = 1.1 * loss_memory / (n * n * 4)
        if all("seconds" in row[impl] for impl in ("plain", "tiled")):
            row["rel_error"] = _rel_error(row["tiled"]["out"], row["plain"]["out"])
        rows.append(row)
    return rows, matmul


def _memory(point: dict[str, Any]) -> str:
    """Peak RSS of the process, and (in brackets) what the loss added on top of its inputs."""
    return f"{_gb(point['peak_rss'])} ({_gb(point['peak_rss'] - point['baseline_rss'])})"


def table(rows: list[dict[str, Any]], matmul: dict[str, Any], dim: int) -> str:
    peak_gflops = max(matmul.get("block", 0.0), matmul.get("square", 0.0))
    lines = [
        f"float32 matmul: {matmul.get('block', 0):.0f} GFLOP/s on the block shape, "
        f"{matmul.get('square', 0):.0f} on 4096^3; peak taken as {peak_gflops:.0f} GFLOP/s",
        "",
        "| N | plain time | tiled time | tiled/plain time | plain peak RSS (loss) "
        "| tiled peak RSS (loss) | tiled/plain loss memory | rel. error "
        "| tiled 6N²D/s: of peak (8N²D run) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        plain, tiled = row["plain"], row["tiled"]
        both = "seconds" in plain and "seconds" in tiled
        cells = [f"{row['n']:,}"]
        cells += [f"{p['seconds']:.3f} s" if "seconds" in p else p["error"] for p in (plain, tiled)]
        cells.append(f"{tiled['seconds'] / plain['seconds']:.2f}x" if both else "-")
        cells += [_memory(p) if "seconds" in p else "-" for p in (plain, tiled)]
        if both:
            loss_memory = [p["peak_rss"] - p["baseline_rss"] for p in (plain, tiled)]
            cells.append(f"1/{loss_memory[0] / max(loss_memory[1], 1):.0f}")
        else:
            cells.append("-")
        cells.append(f"{row['rel_error']:.1e}" if "rel_error" in row else "-")
        if "seconds" in tiled and peak_gflops:
            achieved = 6 * row["n"] ** 2 * dim / tiled["seconds"] / 1e9
            fraction = achieved / peak_gflops  # of 6*N^2*D; tiled runs 8/6 of that
            cells.append(f"{achieved:.0f} GFLOP/s: {fraction:.0%} ({8 / 6 * fraction:.0%})")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark plain vs tiled contrastive loss.")
    parser.add_argument("--sizes", default="1024,4096,16384,32768,65536")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kind", default="clip")
    parser.add_argument("--block-size", type=int, default=LossConfig().block_size)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per point")
    parser.add_argument("--point", nargs=3, metavar=("N", "IMPL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.point:  # a child: one measurement, JSON on stdout
        n, impl, out = args.point
        print(json.dumps(run_point(int(n), impl, args, Path(out))))
        return
    if args.matmul:
        print(json.dumps(run_matmul(args)))
        return
    print(
        f"{args.kind} loss, D={args.dim}, float32, block {args.block_size}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="bench-loss-") as tmp:
        rows, matmul = measure(args, Path(tmp))
    print(table(rows, matmul, args.dim))


if __name__ == "__main__":
    main()
