"""Benchmark the synthetic dataset generator (train.synth) on one CPU core.

    python bench/synth.py [--rounds 3] [--train-shards 8] [--samples-per-shard 1000]

Each round writes train_shards × samples_per_shard train samples plus one shard's worth of val
samples at 64 px into a fresh temp dir, and prints a markdown table with the median round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.synth import generate  # noqa: E402


def _pin_to_one_core() -> str:
    """Pin this process to one core, so the figure is per core whatever numpy's threading."""
    if not hasattr(os, "sched_setaffinity"):
        return "unpinned"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"core {core}"


def _run_round(train_shards: int, samples_per_shard: int, seed: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as out_dir:
        start = time.perf_counter()
        summary = generate(
            Path(out_dir),
            train_shards=train_shards,
            samples_per_shard=samples_per_shard,
            seed=seed,
            val_samples=samples_per_shard,
            image_size=64,
        )
        seconds = time.perf_counter() - start
    return summary["train"]["samples"] + summary["val"]["samples"], seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark train.synth on one core.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-shards", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)

    where = _pin_to_one_core()
    print(f"train.synth, 64 px, {where}\n")
    print("| round | samples | seconds | samples/s |")
    print("|---:|---:|---:|---:|")
    rates = []
    for round_index in range(args.rounds):
        samples, seconds = _run_round(args.train_shards, args.samples_per_shard, round_index)
        rates.append(samples / seconds)
        print(f"| {round_index + 1} | {samples} | {seconds:.2f} | {rates[-1]:.0f} |")
    print(f"| median | | | {statistics.median(rates):.0f} |")


if __name__ == "__main__":
    main()
