r"""Benchmark building an index of a folder of photos: images/s and peak memory per runtime, beside
clip-retrieval's own `clip-retrieval inference` on the same folder and weights.

    python bench/build_folder.py [--images 10000] [--photos DIR] [--runtimes torch,onnx,onnx-int8]
                                 [--rounds 2] [--lock /tmp/duet-bench.lock]
                                 [--clip-retrieval /tmp/cr-venv/bin/clip-retrieval]

The folder holds `--images` generated 640 x 480 JPEGs (quality 90, 4:2:0 as cameras write them,
~60 KB each): smooth colour fields, shapes and sensor-like noise, so that decoding costs what a
photo's does. They are written once into `--photos` (default: the temp dir) and reused. The model
is open_clip's ViT-B-32 with random weights (seed 0; they cost what trained ones do), written as an
artifact with its ONNX towers (fp32, and int8, which passed the export's quality gate: cosine
>= 0.99 to torch) and as an open_clip state dict (`vit-b-32.pt`) for clip-retrieval.

Each run is a whole build in a fresh process, `python -m serve.build_index --runtime R` with its
defaults (thumbnails, index, recall check included), or `clip-retrieval inference` on the same
folder with the same weights (`--clip_model open_clip:ViT-B-32/ABSOLUTE/PATH/vit-b-32.pt`: its
loader passes what follows the model name to open_clip as `pretrained`, which reads a local
file), timed from start to exit. Peak memory is the largest sum of the resident sets of the
process and all its descendants (workers included), polled from /proc every 0.2 s.
clip-retrieval warms its model up with two forward passes of one batch (`--batch_size 256`: the
work of 512 photos) before it reads a photo; the table shows that warm-up (from its log) and
the ratio to clip-retrieval with and without it (a small folder pays it in full, 10k photos
~5%). Rounds alternate the order of the tools (odd rounds as given, even rounds reversed), and
every row shows its ratio to clip-retrieval's run of the same round. `--lock FILE` holds an
exclusive flock on FILE around each timed build, and only then.

clip-retrieval 2.45.0 runs in its own virtual environment, outside the project's (it pins
numpy < 2 and an older open_clip; its `clip` dependency imports pkg_resources, gone from
setuptools 81):

    python3 -m venv /tmp/cr-venv && /tmp/cr-venv/bin/pip install clip-retrieval "setuptools<81"
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Run as a script from anywhere: make the repository root importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

WIDTH_PX, HEIGHT_PX = 640, 480
JPEG_QUALITY = 90
CR_SETTINGS = {"batch_size": 256, "num_prepro_workers": 2}  # see docs/benchmarks.md


def photo(rng: np.random.Generator) -> Image.Image:
    """A 640 x 480 image with a photo's mix of smooth regions, edges and noise."""
    # smooth colour field: a 4 x 3 grid of random colours, bicubically upsampled
    field = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    image = field.resize((WIDTH_PX, HEIGHT_PX), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, WIDTH_PX)), int(rng.integers(0, HEIGHT_PX))
        box = (x0, y0, x0 + int(rng.integers(20, 300)), y0 + int(rng.integers(20, 250)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    pixels = np.asarray(image, np.int16)
    pixels = pixels + rng.normal(0, 6, pixels.shape).astype(np.int16)  # sensor-like noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def ensure_photos(folder: Path, count: int) -> int:
    """`count` photos in `folder` (those there already are kept); their total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            photo(np.random.default_rng(i)).save(tmp, "JPEG", quality=JPEG_QUALITY)
            tmp.rename(path)
    return sum((folder / f"{i:06d}.jpg").stat().st_size for i in range(count))


def ensure_model(root: Path) -> tuple[Path, Path]:
    """(artifact with ONNX fp32 + int8 towers, open_clip state dict .pt) of one random ViT-B-32."""
    artifact, weights = root / "artifact", root / "vit-b-32.pt"
    if not (artifact / "onnx" / "image.int8.onnx").is_file():
        import torch

        from common.artifact import write_artifact
        from common.model import build_model
        from common.onnx_towers import export_onnx

        torch.manual_seed(0)
        model = build_model("ViT-B-32")
        write_artifact(model, artifact, provenance={"bench": "random weights, seed 0"})
        torch.save(model.clip.state_dict(), weights)
        checks = export_onnx(artifact, int8=True)["checks"]
        print(f"ONNX towers checked against torch: {json.dumps(checks)}", file=sys.stderr)
    return artifact, weights


# --- measuring a build ---------------------------------------------------------------------------


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident bytes of `root_pid` and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        with contextlib.suppress(OSError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf(
                "SC_PAGE_SIZE"
            )
    return total


@dataclass
class Run:
    tool: str
    seconds: float
    peak_rss_bytes: int
    count: int
    warmup_seconds: float = 0.0  # clip-retrieval's own warm-up: 2 forward passes of a batch

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds

    @property
    def images_per_second_after_warmup(self) -> float:
        return self.count / (self.seconds - self.warmup_seconds)


def timed(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> Run:
    """Run `command` to its end; its wall time and the peak resident memory of its tree."""
    peak = [0]
    with log_path.open("w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        code = proc.wait()
        seconds = time.perf_counter() - start
        done.set()
        poller.join()
    if code != 0:
        raise RuntimeError(f"{command[0]} failed ({code}); see {log_path}")
    return Run("", seconds, peak[0], 0)


@contextlib.contextmanager
def held(lock: Path | None) -> Iterator[None]:
    """An exclusive flock on `lock` (None: nothing) while the block runs."""
    if lock is None:
        yield
        return
    with lock.open("a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


# --- the tools -----------------------------------------------------------------------------------


def duet_build(runtime: str, photos: Path, artifact: Path, work: Path, lock: Path | None) -> Run:
    out = work / f"index-{runtime}"
    command = [sys.executable, "-m", "serve.build_index", "--model", str(artifact)]
    command += ["--data", str(photos), "--out", str(out), "--runtime", runtime]
    with held(lock):
        run = timed(command, work / f"duet-{runtime}.log")
    run.tool, run.count = (
        f"duet {runtime}",
        json.loads((out / "index.json").read_text())["count"],
    )
    return run


def clip_retrieval(cli: Path, photos: Path, weights: Path, work: Path, lock: Path | None) -> Run:
    out = work / "clip-retrieval"
    command = [str(cli), "inference"]
    command += ["--input_dataset", str(photos), "--output_folder", str(out)]
    command += ["--input_format", "files", "--clip_model", f"open_clip:ViT-B-32/{weights}"]
    command += ["--enable_text", "False", "--enable_metadata", "False"]
    for name, value in CR_SETTINGS.items():
        command += [f"--{name}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with held(lock):
        run = timed(command, work / "clip-retrieval.log", env)
    embeddings = sorted((out / "img_emb").glob("*.npy"))
    run.tool, run.count = (
        "clip-retrieval",
        sum(len(np.load(path, mmap_mode="r")) for path in embeddings),
    )
    warmup = re.search(r"done warming up in ([0-9.]+)s", (work / "clip-retrieval.log").read_text())
    run.warmup_seconds = float(warmup.group(1)) if warmup else 0.0
    return run


# --- rounds and the table ------------------------------------------------------------------------


def tools_in_order(runtimes: list[str], with_cr: bool, round_number: int) -> list[str]:
    """The tools of one round: clip-retrieval second, then the rest; even rounds reversed."""
    tools = [f"duet {r}" for r in runtimes]
    if with_cr:
        tools.insert(min(1, len(tools)), "clip-retrieval")
    return tools if round_number % 2 else tools[::-1]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_round(
    round_number: int, args: argparse.Namespace, photos: Path, work: Path, model: tuple[Path, Path]
) -> None:
    """Every tool once, in this round's order; one table row each, with its ratio to
    clip-retrieval's run of this round."""
    artifact, weights = model
    runs: dict[str, tuple[Run, str]] = {}
    for tool in tools_in_order(args.runtimes.split(","), bool(args.clip_retrieval), round_number):
        load = load_average()
        if tool == "clip-retrieval":
            run = clip_retrieval(args.clip_retrieval, photos, weights, work, args.lock)
        else:
            run = duet_build(tool.removeprefix("duet "), photos, artifact, work, args.lock)
        print(
            f"round {round_number}: {tool} {run.count} images in {run.seconds:.1f} s, peak "
            f"{run.peak_rss_bytes / 2**20:,.0f} MiB, load before {load}",
            file=sys.stderr,
            flush=True,
        )
        runs[tool] = (run, load)
    reference = runs["clip-retrieval"][0] if "clip-retrieval" in runs else None
    for tool, (run, load) in runs.items():
        ratios = "- | -"
        if reference is not None:
            whole = run.images_per_second / reference.images_per_second
            warm = run.images_per_second / reference.images_per_second_after_warmup
            ratios = f"{whole:.2f}x | {warm:.2f}x"
            if run is reference:
                after = run.images_per_second_after_warmup
                ratios = f"1.00x | 1.00x ({after:.1f} images/s after warm-up)"
        warmup = f"{run.warmup_seconds:.1f}" if run.warmup_seconds else "-"
        print(
            f"| {round_number} | {tool} | {run.count:,} | {run.seconds:.1f} "
            f"| {warmup} | {run.images_per_second:.1f} "
            f"| {run.peak_rss_bytes / 2**20:,.0f} | {ratios} | {load} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--photos", type=Path, help="folder of the generated photos (kept)")
    parser.add_argument("--runtimes", default="torch,onnx,onnx-int8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clip-retrieval", type=Path, help="its `clip-retrieval` executable")
    parser.add_argument("--lock", type=Path, help="flock held around each timed build")
    parser.add_argument("--work", type=Path, help="artifact, outputs and logs (default: temp)")
    args = parser.parse_args(argv)
    photos = args.photos or Path(tempfile.gettempdir()) / f"duet-bench-photos-{args.images}"
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-build-folder-"))
    photo_bytes = ensure_photos(photos, args.images)
    model = ensure_model(work)
    print(
        f"{args.images:,} JPEGs of {WIDTH_PX} x {HEIGHT_PX} ({photo_bytes / args.images / 1e3:.0f} "
        f"KB each) in {photos}; ViT-B-32, random weights; {len(os.sched_getaffinity(0))} cores; "
        f"clip-retrieval {CR_SETTINGS}; work in {work}\n"
    )
    print(
        "| round | tool | images | seconds | of which warm-up s | images/s | peak RSS MiB "
        "| vs clip-retrieval | vs clip-retrieval without its warm-up | load before |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for round_number in range(1, args.rounds + 1):
        run_round(round_number, args, photos, work, model)
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
