"""Training throughput: our trainer against open_clip's own trainer (open_clip_train), same work.

    python bench/train_throughput.py [--rounds 3] [--steps 200] [--batch-size 128] [--workers 1]
                                     [--model duet-tiny] [--work-dir DIR] [--no-torchrun]

Both train the same model config (a bundled one, registered with open_clip for its trainer) on
the same synthetic shards (`train.synth`, written once into the work dir), fp32, on CPU, with
the same global batch, data workers and number of steps, no evaluation and no checkpoint until
the end. Each round runs every variant once, in a fresh process, in alternating order (rounds
interleave, so a change in the machine's load hits all variants alike):

- ours, 1 process:        python -m train (--recipe default, overrides)
- open_clip, 1 process:   python -m open_clip_train.main, through a small wrapper (this file's
                          `open-clip` subcommand) that registers the model config first
- ours, torchrun N procs: torchrun --standalone --nproc_per_node=N -m train, batch B/N per rank,
                          workers/N per rank (at least 1). open_clip's trainer has no such row:
                          under torchrun on CPU it passes device_ids to DDP and crashes.

Every step of both trainers leaves a wall-clock marker (ours: metrics.jsonl with
logging.every_steps=1; open_clip: its per-step log line, --log-every-n-steps 1, with the log
time in milliseconds). Steady-state samples/s = (last step - warm-up step) x global batch / the
time between those markers; the warm-up (10% of the steps, at least 3) holds the start of the
data workers, shuffle buffers and first allocations. Time to first step runs from launching the
process to the first step's marker. CPU ms per sample is the CPU time (user + system) of the
whole process tree between the same two markers per sample trained: on a shared machine it moves
far less than wall-clock figures. Peak RSS is the peak of the summed RSS of the whole process
tree (launcher, ranks, data workers), sampled every 0.2 s; PSS (shared pages divided among the
processes sharing them) is shown beside it, since forked workers share torch's pages.
Torch threads: `--threads` (default all cores) as OMP_NUM_THREADS for each single process, and
split among torchrun's ranks.

open_clip's trainer needs webdataset <= 0.2.86 (we use 1.x) and pandas: they are installed once,
with pip, into WORK_DIR/open_clip_env and put first on PYTHONPATH for its runs only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OPEN_CLIP_ENV_PACKAGES = [
    "webdataset==0.2.86",
    "pandas<3",
    "python-dateutil",
    "pytz",
    "tzdata",
    "six",
]
# open_clip's per-step line: "1731234567.123 | INFO | Train Epoch: 0 [ 128/25600 (1%)] ..."
OPEN_CLIP_STEP = re.compile(r"^(\d+\.\d+) \| INFO \| Train Epoch: \d+ \[\s*(\d+)/")


@dataclass(slots=True)
class Variant:
    name: str
    trainer: str  # "ours" | "open_clip"
    processes: int


@dataclass(slots=True)
class RunResult:
    variant: str
    round: int
    samples_per_s: float
    first_step_s: float
    cpu_ms_per_sample: float
    peak_rss_gb: float
    peak_pss_gb: float
    steps: int


@dataclass(slots=True)
class Workload:
    """The work both trainers do: model, data, global batch, workers, steps."""

    model: str
    shards: str
    global_batch: int
    workers: int
    steps: int
    threads: int
    work_dir: Path
    timeout_s: float
    warmup_steps: int = field(init=False)

    def __post_init__(self) -> None:
        self.warmup_steps = max(3, self.steps // 10)


# ---------------------------------------------------------------- process tree and memory


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children, tree, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; (0, 0) once it is gone."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


class TreeMonitor(threading.Thread):
    """Samples a process tree every interval: peak summed RSS and PSS, and CPU time over time.

    CPU seconds are the useful figure on a shared machine: other work stretches wall-clock
    time by whatever share of the cores it takes, but barely the CPU time a step costs.
    """

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss_kb = self.peak_pss_kb = 0
        self.cpu: list[tuple[float, float]] = []  # (wall-clock time, CPU seconds of the tree)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            tree = process_tree(self.pid)
            now = time.time()
            sizes = [_memory_kb(p) for p in tree]
            self.peak_rss_kb = max(self.peak_rss_kb, sum(r for r, _ in sizes))
            self.peak_pss_kb = max(self.peak_pss_kb, sum(p for _, p in sizes))
            self.cpu.append((now, sum(_cpu_s(p) for p in tree)))
            self._done.wait(self.interval_s)

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds the tree used between two wall-clock times (the nearest samples)."""

        def at(t: float) -> float:
            return min(self.cpu, key=lambda sample: abs(sample[0] - t))[1]

        return at(end) - at(start)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _kill_tree(pid: int) -> None:
    for p in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


# ---------------------------------------------------------------- preparing the work dir


def prepare_data(work_dir: Path, samples_needed: int, shards: int) -> str:
    """Synthetic shards with at least `samples_needed` samples (reused when big enough)."""
    from train.synth import generate

    out = work_dir / "data"
    per_shard = -(-samples_needed // shards)
    summary_path = out / "dataset.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary["train"]["samples"] >= samples_needed and summary["train"]["shards"] == shards:
            return f"{out}/train/shard-{{000000..{shards - 1:06d}}}.tar"
    generate(out, train_shards=shards, samples_per_shard=per_shard, seed=0, val_samples=64)
    return f"{out}/train/shard-{{000000..{shards - 1:06d}}}.tar"


def prepare_open_clip_env(work_dir: Path) -> Path:
    """pip-install open_clip_train's own dependencies into WORK_DIR/open_clip_env, once."""
    env_dir = work_dir / "open_clip_env"
    done = env_dir / ".installed"
    if not done.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            + ["--target", str(env_dir), "--no-deps", *OPEN_CLIP_ENV_PACKAGES],
            check=True,
        )
        done.write_text("\n".join(OPEN_CLIP_ENV_PACKAGES) + "\n")
    return env_dir


# ---------------------------------------------------------------- the commands


def ours_command(w: Workload, processes: int, run_dir: Path) -> list[str]:
    launcher = [sys.executable, "-m", "train"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "train",
        ]
    overrides = {
        "run_dir": run_dir,
        "model.name": w.model,
        "data.train_shards": w.shards,
        "data.val_shards": "",
        "data.zeroshot_file": "",
        "data.batch_size_per_rank": w.global_batch // processes,
        "data.workers": max(1, w.workers // processes) if w.workers else 0,
        "steps": w.steps,
        "checkpoint.every_steps": w.steps,  # only the final save, after the last marker
        "logging.every_steps": 1,
        "logging.progress": "false",
        "logging.tensorboard": "false",
        "device": "cpu",
    }
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    return [*launcher, "--recipe", "default", *sets]


def open_clip_command(w: Workload, log_dir: Path, name: str) -> list[str]:
    config = REPO_ROOT / "common" / "model_configs" / f"{w.model}.json"
    args = {
        "--train-data": w.shards,
        "--dataset-type": "webdataset",
        "--train-num-samples": w.steps * w.global_batch,
        "--batch-size": w.global_batch,
        "--workers": w.workers,
        "--epochs": 1,
        "--precision": "fp32",
        "--model": w.model,
        "--device": "cpu",
        "--logs": log_dir,
        "--name": name,
        "--log-every-n-steps": 1,
        "--warmup": 10,
        "--lr": 1e-3,
        "--seed": 0,
    }
    flat = [str(a) for k, v in args.items() for a in (k, v)]
    return [sys.executable, __file__, "open-clip", "--model-config", str(config), "--", *flat]


# ---------------------------------------------------------------- running and reading markers


def ours_markers(run_dir: Path) -> dict[int, float]:
    markers = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            markers[int(record["step"])] = float(record["time"])
    return markers


def open_clip_markers(log_file: Path, global_batch: int) -> dict[int, float]:
    markers = {}
    for line in log_file.read_text().splitlines():
        if m := OPEN_CLIP_STEP.match(line):
            markers[int(m.group(2)) // global_batch] = float(m.group(1))
    return markers


def run_variant(w: Workload, v: Variant, round_index: int, env_dir: Path) -> RunResult:
    name = f"{v.name.replace(' ', '_').replace(',', '')}-round{round_index}"
    out_dir = w.work_dir / "runs" / name
    # the same threads for both single-process trainers; torchrun's ranks share them out
    threads = max(1, w.threads // v.processes)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    if v.trainer == "ours":
        cmd = ours_command(w, v.processes, out_dir)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    else:
        cmd = open_clip_command(w, w.work_dir / "runs", name)
        env["PYTHONPATH"] = str(env_dir)
    with contextlib.suppress(FileNotFoundError):
        import shutil

        shutil.rmtree(out_dir)
    log_path = w.work_dir / "runs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        launched = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        monitor = TreeMonitor(proc.pid)
        monitor.start()
        try:
            proc.wait(timeout=w.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
        finally:
            monitor.stop()
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{v.name} failed (exit {proc.returncode}); {log_path}:\n{tail}")
    if v.trainer == "ours":
        markers = ours_markers(out_dir)
    else:
        markers = open_clip_markers(out_dir / "out.log", w.global_batch)
    return _result(w, v, round_index, markers, launched, monitor)


def _result(
    w: Workload,
    v: Variant,
    round_index: int,
    markers: dict[int, float],
    launched: float,
    monitor: TreeMonitor,
) -> RunResult:
    last = max(markers, default=0)
    if last <= w.warmup_steps or w.warmup_steps not in markers or 1 not in markers:
        raise RuntimeError(f"{v.name}: step markers {sorted(markers)[:5]}... up to {last}")
    elapsed = markers[last] - markers[w.warmup_steps]
    samples = (last - w.warmup_steps) * w.global_batch
    cpu_s = monitor.cpu_between(markers[w.warmup_steps], markers[last])
    return RunResult(
        variant=v.name,
        round=round_index,
        samples_per_s=samples / elapsed,
        cpu_ms_per_sample=1000 * cpu_s / samples,
        first_step_s=markers[1] - launched,
        peak_rss_gb=monitor.peak_rss_kb / 2**20,
        peak_pss_gb=monitor.peak_pss_kb / 2**20,
        steps=last,
    )


# ---------------------------------------------------------------- report


def print_table(w: Workload, variants: list[Variant], results: list[RunResult]) -> None:
    print(
        f"\n{w.model}, global batch {w.global_batch}, {w.workers} data workers in all, "
        f"{w.steps} steps (steady state: steps {w.warmup_steps}..{w.steps}), fp32, CPU "
        f"({os.cpu_count()} cores, {w.threads} torch threads per single process)\n"
    )
    print(
        "| variant | samples/s per round | median samples/s | CPU ms per sample (median) "
        "| time to first step (median) | peak RSS, process tree | peak PSS | steps |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    medians: dict[str, tuple[float, float]] = {}
    for v in variants:
        rows = [r for r in results if r.variant == v.name]
        if not rows:
            continue
        medians[v.name] = (
            statistics.median(r.samples_per_s for r in rows),
            statistics.median(r.cpu_ms_per_sample for r in rows),
        )
        per_round = ", ".join(f"{r.samples_per_s:.0f}" for r in rows)
        print(
            f"| {v.name} | {per_round} | {medians[v.name][0]:.0f} | {medians[v.name][1]:.2f} "
            f"| {statistics.median(r.first_step_s for r in rows):.1f} s "
            f"| {max(r.peak_rss_gb for r in rows):.2f} GB "
            f"| {max(r.peak_pss_gb for r in rows):.2f} GB | {rows[0].steps} |"
        )
    ours, theirs = medians.get("ours, 1 process"), medians.get("open_clip, 1 process")
    if ours and theirs:
        print(
            f"\nours / open_clip, 1 process each: samples/s {ours[0] / theirs[0]:.2f}x, "
            f"CPU time per sample {ours[1] / theirs[1]:.2f}x"
        )


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--workers", type=int, default=1, help="data workers in all")
    parser.add_argument("--model", default="duet-tiny", help="a bundled model config")
    parser.add_argument("--shards", type=int, default=8, help="train shards to write")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the torchrun row")
    parser.add_argument("--no-torchrun", action="store_true", help="leave out the torchrun row")
    parser.add_argument(
        "--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench-train-throughput"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads per single process"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = parser.parse_args(argv)
    if args.batch_size % args.nproc:
        parser.error(f"--batch-size must be divisible by --nproc ({args.nproc})")
    if args.shards < max(args.workers, 1) * args.nproc:
        parser.error("--shards must be >= workers x nproc (every worker needs a shard)")
    if args.steps < 6:
        parser.error("--steps must be >= 6 (a warm-up and a measured window)")
    return args


def main(argv: list[str]) -> list[RunResult]:
    args = _parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    # open_clip rounds the steps up to whole batches per worker: give it a margin of samples
    needed = (args.steps + 2 * max(1, args.workers)) * args.batch_size
    w = Workload(
        model=args.model,
        shards=prepare_data(work_dir, needed, args.shards),
        global_batch=args.batch_size,
        workers=args.workers,
        steps=args.steps,
        threads=args.threads,
        work_dir=work_dir,
        timeout_s=args.timeout,
    )
    env_dir = prepare_open_clip_env(work_dir)
    variants = [
        Variant("ours, 1 process", "ours", 1),
        Variant("open_clip, 1 process", "open_clip", 1),
    ]
    if not args.no_torchrun:
        variants.append(Variant(f"ours, torchrun {args.nproc} processes", "ours", args.nproc))
    results = []
    for round_index in range(1, args.rounds + 1):
        order = variants if round_index % 2 else variants[::-1]
        for v in order:
            result = run_variant(w, v, round_index, env_dir)
            print(
                f"round {round_index}: {v.name}: {result.samples_per_s:.0f} samples/s, "
                f"{result.cpu_ms_per_sample:.2f} CPU ms/sample, "
                f"first step {result.first_step_s:.1f} s, peak RSS {result.peak_rss_gb:.2f} GB",
                flush=True,
            )
            results.append(result)
    print_table(w, variants, results)
    return results


# ---------------------------------------------------------------- the open_clip wrapper


def open_clip_main(argv: list[str]) -> None:
    """Register our model config with open_clip, then run open_clip_train.main.main(ARGS).

    Its log lines get millisecond epoch timestamps (its own format has whole seconds), so that
    every step leaves a marker as precise as ours; nothing else of its trainer is changed.
    """
    parser = argparse.ArgumentParser(prog="train_throughput.py open-clip")
    parser.add_argument("--model-config", required=True)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    import logging

    import open_clip
    import open_clip_train.main as oc_main

    open_clip.add_model_config(args.model_config)
    original_setup = oc_main.setup_logging

    def setup_logging(log_file: str, level: int, include_host: bool = False) -> None:
        original_setup(log_file, level, include_host)
        precise = logging.Formatter("%(created).3f | %(levelname)s | %(message)s")
        for handler in logging.root.handlers:
            handler.setFormatter(precise)

    oc_main.setup_logging = setup_logging
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.exit(oc_main.main(rest) or 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["open-clip"]:
        open_clip_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
