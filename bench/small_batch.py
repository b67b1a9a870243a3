"""Small-batch quality: do negatives beyond the batch make batch 32 train like batch 256?

    python bench/small_batch.py [--samples 49152] [--seeds 0,1] [--model duet-tiny]
                                [--palette basic|wide] [--lr-scaling none|sqrt|linear]
                                [--methods M,...|relations] [--merge EARLIER.json ...]
                                [--out FILE.json]
    python bench/small_batch.py --methods '' --merge A.json B.json ...   (their table only)
    python bench/small_batch.py ... [--jobs N]             (N runs at a time: a GPU's room)
    python bench/small_batch.py --overhead MODEL [--overhead-modes batch,hard-neg,...]
                                [--device cpu|cuda] [--precision fp32|bf16]

On the compositional synthetic set (`python -m train.synth --kind compositional`, generated
into --data when missing), with equal samples seen, each method trains from scratch once per
seed and is evaluated on the held-out split:

    plain b32     loss.negatives=batch, global batch 32
    plain b256    loss.negatives=batch, global batch 256
    queue b32     loss.negatives=queue, K = 4096 momentum keys, global batch 32
    global b32    loss.negatives=global (FastCLIP-v3: learned temperature), global batch 32

`--methods relations` runs plain b32 against loss.hard_negatives at batch 32 with the shard's
negatives (the set is written with `--train-negatives`) and with generated ones
(data.hard_negatives.generate=always), and tabulates what hard negatives are for: the
hard-negative accuracies on all held-out scenes, on those with unseen colour-shape pairs, and
blind (the mean image for every image), the negatives used per sample, and each target met or
missed. `--overhead MODEL [--overhead-modes ...]` times one training step per mode instead.

Columns: zero-shot top-1 on the held-out split (and on its scenes whose class never occurs in
training) and top-5, text->image recall@1/5, the compositional hard-negative
accuracies (attribute swap, object swap, relation replaced), samples/s over the run and the
run's peak RSS. Each run is a fresh subprocess (its own peak memory; no state shared between
runs). Cells are the mean over seeds, with the spread (max - min) in brackets. The verdict lines
say whether a batch-32 method reached plain b256 (within the seeds' spread) or beat plain b32
by >= 3 points, on zero-shot top-1 and recall@5. The queue's overhead is its step time over
plain b32's, at equal batch.

Keep the machine otherwise idle: with 2 cores, torch's threads slow down several-fold when
anything else runs, and samples/s is then meaningless.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

GAP_MIN = 0.05
"""Zero-shot points plain b256 must lead plain b32 by before batch-32 methods are compared."""
GAP_CLOSED_TARGET = 0.6
"""Share of that gap a batch-32 method should close."""
METHODS: dict[str, tuple[int, list[str]]] = {
    "plain b32": (32, []),
    "plain b256": (256, []),
    "queue b32": (32, ["loss.negatives=queue", "loss.queue_size=4096"]),
    "global b32": (32, ["loss.negatives=global"]),
    # not in the default run (--methods): the queue without a key encoder, SogCLR's fixed
    # temperature
    "queue m=0 b32": (
        32,
        ["loss.negatives=queue", "loss.queue_size=4096", "loss.queue_momentum=0"],
    ),
    "global fixed-t b32": (32, ["loss.negatives=global", "loss.global_temperature=fixed"]),
    # NegCLIP's hard-negative captions as extra image->text columns (RELATION_METHODS): the
    # shard's (train.synth --train-negatives: the scene's own, checked false for it), or the
    # built-in generator's from the caption alone
    "hard-neg shard b32": (32, ["loss.hard_negatives=true"]),
    "hard-neg generated b32": (
        32,
        ["loss.hard_negatives=true", "data.hard_negatives.generate=always"],
    ),
    # the relation alone: one generated negative per sample, the opposite relation (on the
    # compositional set the generator's replace_relation equals the shard's), K = 1 so that the
    # step encodes 1 + 1 captions per image (with K = 3 it would encode two empty ones beside)
    "hard-neg relation b32": (
        32,
        [
            "loss.hard_negatives=true",
            "data.hard_negatives.generate=always",
            "data.hard_negatives.kinds=replace_relation",
            "data.hard_negatives.max_per_sample=1",
        ],
    ),
    # NegCLIP's one negative per image (a kind drawn anew each time the sample is read): the
    # step costs 1 + 1 captions per image instead of 1 + 3
    "hard-neg shard K1 b32": (
        32,
        ["loss.hard_negatives=true", "data.hard_negatives.max_per_sample=1"],
    ),
}
DEFAULT_METHODS = ("plain b32", "plain b256", "queue b32", "global b32")
# --lr-scaling: the learning rate at batch B is --lr x (B / REFERENCE_BATCH) ** exponent
REFERENCE_BATCH = 32
LR_SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
RELATION_METHODS = ("plain b32", "hard-neg shard b32", "hard-neg generated b32")
COLUMNS = (
    ("zero-shot", "zeroshot_top1"),
    ("held-out zs", "zeroshot_top1_held_out"),
    ("zs top-5", "zeroshot_top5"),
    ("R@1", "text_to_image_recall@1"),
    ("R@5", "text_to_image_recall@5"),
    ("attr swap", "compositional_swap_attribute"),
    ("obj swap", "compositional_swap_object"),
    ("relation", "compositional_replace_relation"),
)
# the relations table (--methods relations): the hard-negative accuracies on all held-out
# scenes, on those with a colour-shape pair never seen in training, and blind (the mean image)
RELATION_COLUMNS = (
    ("zero-shot", "zeroshot_top1"),
    ("R@5", "text_to_image_recall@5"),
    ("attr swap", "compositional_swap_attribute"),
    ("obj swap", "compositional_swap_object"),
    ("relation", "compositional_replace_relation"),
    ("relation, held-out pairs", "compositional_held_out_replace_relation"),
    ("blind attr", "compositional_blind_swap_attribute"),
    ("blind obj", "compositional_blind_swap_object"),
    ("blind relation", "compositional_blind_replace_relation"),
)


def dataset(
    data: Path, train_shards: int, samples_per_shard: int, palette: str = "basic"
) -> dict[str, str]:
    """The compositional set of `palette` under `data` (generated once); the trainer's data.*
    fields."""
    summary = data / "dataset.json"
    info = json.loads(summary.read_text()) if summary.is_file() else {}
    # train samples carry their hard negatives (read only with loss.hard_negatives); writing
    # them changes no image or caption, so a set without them is simply written again
    if not info.get("train_negatives") or info.get("palette", "basic") != palette:
        subprocess.run(
            [sys.executable, "-m", "train.synth", "--kind", "compositional", "--out", str(data),
             "--train-shards", str(train_shards), "--samples-per-shard", str(samples_per_shard),
             "--val-samples", "2000", "--seed", "0", "--train-negatives", "--palette", palette],
            cwd=ROOT, check=True,
        )  # fmt: skip
    info = json.loads(summary.read_text())
    return {
        "data.train_shards": str(data / info["train"]["pattern"]),
        "data.val_shards": str(data / info["val"]["pattern"]),
        "data.zeroshot_file": str(data / "zeroshot.json"),
    }


def scaled_lr(lr: float, batch: int, scaling: str) -> float:
    """`lr` (set for batch 32) scaled to `batch`: the square-root rule (Adam-type optimizers,
    Malladi et al. 2022), the linear one (Goyal et al. 2017), or none."""
    return lr * (batch / REFERENCE_BATCH) ** LR_SCALING[scaling]


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    """Train one (method, seed) in this process; its eval, throughput and peak RSS."""
    from common.config import apply_overrides
    from train.config import TrainConfig
    from train.trainer import Trainer

    batch, extra = METHODS[args.method]
    steps = args.samples // batch
    data = dataset(args.data, args.train_shards, args.samples_per_shard, args.palette)
    cfg = apply_overrides(
        TrainConfig(),
        [
            f"run_dir={args.run_dir}",
            f"steps={steps}",
            f"seed={args.seed}",
            f"model.name={args.model}",
            f"data.batch_size_per_rank={batch}",
            "data.workers=1",
            f"optim.lr={scaled_lr(args.lr, batch, args.lr_scaling)}",
            f"optim.warmup_steps={max(1, steps // 20)}",
            f"checkpoint.every_steps={steps}",
            f"logging.every_steps={max(1, steps // 20)}",
            "logging.progress=false",
            "logging.tensorboard=false",
            *(f"{k}={v}" for k, v in data.items()),
            *extra,
        ],
    )
    start = time.perf_counter()
    trainer = Trainer(cfg, overwrite=True)
    try:
        results = trainer.train()
    finally:
        trainer.close()
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(args.run_dir) / "metrics.jsonl").open()]
    rates = [r["train/samples_per_s"] for r in records if "train/samples_per_s" in r]
    rates = rates[1:]  # the first window holds the start-up
    used = [r["train/hard_negatives_per_sample"] for r in records if "train/hard_negatives" in r]
    return {
        **results,
        # loss.hard_negatives: real negatives per sample over the logged windows (0 without)
        "hard_negatives_per_sample": sum(used) / max(1, len(used)),
        "samples_per_s": sum(rates) / max(1, len(rates)),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": steps,
        "seed": args.seed,
    }


# --overhead's modes: the name in its table, the loss.* fields it sets, and the hard-negative
# captions per sample (all real): K = 3 is data.hard_negatives' default (the text tower
# encodes 4 captions per sample), K = 1 NegCLIP's one negative per image. The texts are cut to
# their length as the trainer's batches are, except in the "-padded" modes: the whole context,
# as before training cut them (the batch's other figures are relative to "batch", cut)
OVERHEAD_MODES: dict[str, tuple[str, dict[str, Any], int]] = {
    "batch": ("batch", {}, 0),
    "queue": ("queue (key encoder)", {"negatives": "queue"}, 0),
    "queue-m0": ("queue m=0", {"negatives": "queue", "queue_momentum": 0.0}, 0),
    "global": ("global", {"negatives": "global"}, 0),
    "hard-neg": ("hard negatives (K = 3)", {"hard_negatives": True}, 3),
    "hard-neg-k1": ("hard negatives (K = 1)", {"hard_negatives": True}, 1),
    "batch-padded": ("batch, texts padded to the context", {}, 0),
    "hard-neg-padded": ("hard negatives (K = 3), padded", {"hard_negatives": True}, 3),
}


def step_overhead(
    model_name: str,
    batch: int,
    steps: int,
    modes: list[str],
    device: str = "cpu",
    precision_name: str = "fp32",
) -> list[str]:
    """Time of a training step (forward, backward, optimizer, and the negatives' own work) per
    mode of OVERHEAD_MODES, on random images and captions: what the modes cost at a model's
    real size, where training a whole run on this machine is out of reach. The modes take
    turns step by step (a round each), so that a drift in the machine's speed hits all alike.
    On CUDA each step is timed to its last kernel (synchronized)."""
    import torch

    from common.model import build_model
    from train.compute import Precision
    from train.config import LossConfig, OptimConfig
    from train.distributed import DistInfo
    from train.negatives import Negatives
    from train.objective import StepLoss
    from train.optimizer import build_optimizer
    from train.step import forward_backward

    info = DistInfo(0, 1, 0, torch.device(device))
    precision = Precision(precision_name, info.device)
    torch.manual_seed(0)
    model = build_model(model_name).to(info.device)
    model.train()
    inputs_by_k = {
        (k, padded): _overhead_inputs(model, model_name, batch, k, info.device, padded)
        for k in (0, 1, 3)
        for padded in (False, True)
    }
    sync = torch.cuda.synchronize if info.device.type == "cuda" else lambda: None
    optimizer = build_optimizer(model, OptimConfig())
    configs = {m: LossConfig(**OVERHEAD_MODES[m][1]) for m in dict.fromkeys(["batch", *modes])}
    states = {m: Negatives(cfg, model, info) for m, cfg in configs.items()}
    for state in states.values():
        state.set_num_samples(batch * (steps + 1))
    elapsed: dict[str, list[float]] = {m: [] for m in configs}
    for step in range(steps + 1):  # the first round warms up
        for mode, cfg in configs.items():
            inputs = inputs_by_k[OVERHEAD_MODES[mode][2], mode.endswith("-padded")]
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            ids = torch.arange(batch, device=info.device) + step * batch
            step_negatives = states[mode].before_step(
                inputs.images, inputs.tokens, ids, precision, 0
            )
            forward_backward(model, inputs, StepLoss(cfg, info, step_negatives), precision)
            optimizer.step()
            states[mode].after_step(model, applied=True)
            sync()
            elapsed[mode].append(time.perf_counter() - start)
    times = {m: sorted(e[1:])[len(e[1:]) // 2] for m, e in elapsed.items()}
    where = f"{device}, {precision_name}"
    lines = [
        f"| {model_name}, batch {batch}, {where} | step s (median of {steps}) | x batch |",
        "|---|---:|---:|",
    ]
    for mode, seconds in times.items():
        name = OVERHEAD_MODES[mode][0]
        lines.append(f"| {name} | {seconds:.3f} | {seconds / times['batch']:.2f} |")
    return lines


def _overhead_inputs(
    model: Any, model_name: str, batch: int, k: int, device: Any, padded: bool = False
) -> Any:
    """Random images at the model's size and captions, with `k` hard negatives per sample
    (all real; none for k = 0), as train.objective.Inputs on `device`; the texts cut to their
    length as the trainer's batches are, unless `padded`."""
    import torch

    from common.model import cut_text_padding, text_pooling
    from common.preprocess import preprocess_config, tokenizer
    from train.objective import Inputs

    size = preprocess_config(model.clip).size
    side = size[0] if isinstance(size, tuple | list) else size
    images = torch.randn(batch, 3, side, side, device=device)
    tokenize = tokenizer(model_name)
    tokens = tokenize([f"a red object {i} left of a blue one" for i in range(batch)])
    negative_tokens = tokenize(
        [f"a red object {i} right of a blue one {j}" for i in range(batch) for j in range(k)]
    ).unflatten(0, (batch, k))
    pooling = text_pooling(model.clip)
    if pooling is not None and not padded:  # cut to their length, as the trainer's batches
        tokens, negative_tokens = cut_text_padding(pooling, tokens, negative_tokens)
    if not k:
        return Inputs(images, tokens.to(device))
    negative_mask = torch.ones(batch, k, dtype=torch.bool, device=device)
    return Inputs(images, tokens.to(device), negative_tokens.to(device), negative_mask)


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = sum(values) / len(values)
    spread = max(values) - min(values)
    if len(values) == 1:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ({spread * scale:.{digits}f})"


def table(
    results: dict[str, list[dict[str, Any]]], columns: tuple[tuple[str, str], ...] = COLUMNS
) -> str:
    header = ["method", *(name for name, _ in columns), "samples/s", "peak RSS MB"]
    if columns is RELATION_COLUMNS:
        header.insert(-2, "negatives/sample")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in results.items():
        cells = [method]
        for _, key in columns:
            values = [r[key] for r in runs if key in r]
            cells.append(_cell(values) if values else "-")
        if columns is RELATION_COLUMNS:
            cells.append(_cell([r.get("hard_negatives_per_sample", 0.0) for r in runs], 1.0, 2))
        cells.append(_cell([r["samples_per_s"] for r in runs], 1.0, 0))
        cells.append(f"{max(r['peak_rss_mb'] for r in runs):.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# (column key, the target, whether it is a floor (>=) or a ceiling (<=)) for hard negatives
RELATION_TARGETS = (
    ("compositional_replace_relation", 0.90, True),
    ("compositional_held_out_replace_relation", 0.80, True),
    ("compositional_swap_attribute", 0.97, True),
    ("compositional_swap_object", 0.97, True),
    ("compositional_blind_swap_attribute", 0.60, False),
    ("compositional_blind_swap_object", 0.60, False),
    ("compositional_blind_replace_relation", 0.60, False),
)


def relation_verdicts(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each hard-negative method against the relation targets (seed means), and its zero-shot
    and recall@5 against plain b32's (target: within 2 points)."""

    def mean(method: str, key: str) -> float:
        values = [r[key] for r in results[method] if key in r]
        return sum(values) / len(values) if values else float("nan")

    lines = []
    for method in (m for m in results if m.startswith("hard-neg")):
        for key, target, floor in RELATION_TARGETS:
            value = mean(method, key)
            met = value >= target if floor else value <= target
            sign = ">=" if floor else "<="
            lines.append(
                f"{method} {key}: {value * 100:.1f} (target {sign} {target * 100:.0f}: "
                f"{'met' if met else 'missed'})"
            )
        if "plain b32" not in results:
            continue
        for key in ("zeroshot_top1", "text_to_image_recall@5"):
            delta = mean(method, key) - mean("plain b32", key)
            lines.append(
                f"{method} {key}: {delta * 100:+.1f} points vs plain b32 "
                f"(target within 2: {'met' if delta >= -0.02 else 'missed'})"
            )
    return lines


def gap_verdicts(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """How much of plain b32's zero-shot gap to plain b256 each batch-32 method closes (seed
    means; target >= GAP_CLOSED_TARGET); nothing to judge unless b256 leads by >= GAP_MIN."""
    if "plain b32" not in results or "plain b256" not in results:
        return []

    def mean(method: str) -> float:
        return sum(r["zeroshot_top1"] for r in results[method]) / len(results[method])

    small, big = mean("plain b32"), mean("plain b256")
    gap = big - small
    if gap < GAP_MIN:
        return [
            f"plain b256 leads plain b32 by {gap * 100:.1f} zero-shot points, under the "
            f"{GAP_MIN * 100:.0f} a comparison of batch-32 methods needs"
        ]
    lines = [f"plain b256 leads plain b32 by {gap * 100:.1f} zero-shot points (>= 5: the gap)"]
    for method in results:
        if method.startswith("plain") or not method.endswith("b32"):
            continue
        closed = (mean(method) - small) / gap
        met = "met" if closed >= GAP_CLOSED_TARGET else "missed"
        lines.append(
            f"{method} zero-shot: closes {closed * 100:.0f}% of the gap "
            f"(target >= {GAP_CLOSED_TARGET * 100:.0f}%: {met})"
        )
    return lines


def verdicts(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Which batch-32 method, if any, met the target, metric by metric."""

    def stats(method: str, key: str) -> tuple[float, float, float]:
        values = [r[key] for r in results[method]]
        return sum(values) / len(values), min(values), max(values)

    lines = []
    for method in results:
        if method.startswith(("plain", "hard-neg")) or "plain b32" not in results:
            continue
        for name, key in (("zero-shot", "zeroshot_top1"), ("R@5", "text_to_image_recall@5")):
            mean, _, high = stats(method, key)
            big, big_low, _ = stats("plain b256", key) if "plain b256" in results else (0, 1, 0)
            small, _, _ = stats("plain b32", key)
            reached = high >= big_low  # the seed ranges touch or overlap
            beat = mean - small >= 0.03
            lines.append(
                f"{method} {name}: {mean * 100:.1f} vs plain b32 {small * 100:.1f} "
                f"({(mean - small) * 100:+.1f} points: {'>= 3, met' if beat else '< 3'}), "
                f"vs plain b256 {big * 100:.1f} "
                f"({'reached within seed spread' if reached else 'not reached'})"
            )
    lines += gap_verdicts(results)
    for method in results:
        if method.startswith("plain") or "plain b32" not in results:
            continue
        plain = sum(r["samples_per_s"] for r in results["plain b32"]) / len(results["plain b32"])
        mine = sum(r["samples_per_s"] for r in results[method]) / len(results[method])
        ratio = plain / mine
        target = (
            f" (target <= 1.3x: {'met' if ratio <= 1.3 else 'missed'})"
            if "queue" in method or method.startswith("hard-neg")
            else ""
        )
        lines.append(f"{method}: step time {ratio:.2f}x plain b32's at equal batch{target}")
    return lines


def merged(files: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """The runs of earlier --out files, per method in first-seen order; a (method, seed) that
    two files hold is an error, not a second sample."""
    results: dict[str, list[dict[str, Any]]] = {}
    seen: dict[tuple[str, Any], Path] = {}
    for file in files:
        for method, runs in json.loads(file.read_text()).items():
            for run in runs:
                key = (method, run.get("seed"))
                if key[1] is not None and key in seen:
                    raise SystemExit(f"{method} seed {key[1]} is in both {seen[key]} and {file}")
                seen[key] = file
                results.setdefault(method, []).append(run)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=49152, help="samples seen per run")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"some of: {', '.join(METHODS)}; or 'relations': {', '.join(RELATION_METHODS)}",
    )
    parser.add_argument("--model", default="duet-tiny")
    parser.add_argument("--lr", type=float, default=1e-3, help="at batch 32")
    parser.add_argument(
        "--lr-scaling",
        choices=tuple(LR_SCALING),
        default="none",
        help="how the learning rate grows with the batch (from --lr at batch 32)",
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data/compositional")
    parser.add_argument("--train-shards", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument(
        "--palette",
        choices=("basic", "wide"),
        default="basic",
        help="the set's colours and shapes: basic (30 classes) or wide (256); --data must "
        "differ per palette (a set of the other palette there is written again)",
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "runs/bench-small-batch")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-small-batch.json")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="earlier runs' --out JSON files: their runs join the table (with --methods '' "
        "nothing is trained: the table of these alone)",
    )
    parser.add_argument(
        "--overhead",
        metavar="MODEL",
        help="only time one training step per loss.negatives mode for MODEL (e.g. ViT-B-32)",
    )
    parser.add_argument("--overhead-steps", type=int, default=3)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="--overhead: where the steps run (the training runs take the trainer's device=auto)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="--overhead: the autocast precision",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training runs at a time (a GPU has room for several duet-tiny runs; their "
        "samples/s then share it, so compare it only between runs made alike)",
    )
    parser.add_argument(
        "--overhead-modes",
        default=",".join(OVERHEAD_MODES),
        help=f"--overhead: some of {', '.join(OVERHEAD_MODES)} (batch always runs)",
    )
    parser.add_argument("--method", help=argparse.SUPPRESS)  # one run, in a subprocess
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        args.result.write_text(json.dumps(one_run(args)))
        return
    if args.overhead:
        modes = args.overhead_modes.split(",")
        if unknown := set(modes) - set(OVERHEAD_MODES):
            parser.error(f"--overhead-modes: unknown {', '.join(sorted(unknown))}")
        print(
            "\n".join(
                step_overhead(
                    args.overhead, 32, args.overhead_steps, modes, args.device, args.precision
                )
            )
        )
        return
    methods = (
        list(RELATION_METHODS)
        if args.methods == "relations"
        else [m for m in args.methods.split(",") if m]
    )
    if missing := [m for m in methods if m not in METHODS]:
        parser.error(f"--methods: unknown {', '.join(missing)}")
    if not methods and not args.merge:
        parser.error("--methods '' trains nothing: give --merge files to tabulate")
    results = merged(args.merge)
    if methods:
        dataset(args.data, args.train_shards, args.samples_per_shard, args.palette)  # once
    started = time.perf_counter()
    scaling = "" if args.lr_scaling == "none" else f"-lr-{args.lr_scaling}"
    planned = [
        (method, seed, f"{method.replace(' ', '-')}{scaling}-seed{seed}")
        for method in methods
        for seed in (int(s) for s in args.seeds.split(","))
    ]
    if planned:
        args.runs.mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen[bytes], str, str]] = []

    def finish(process: subprocess.Popen[bytes], method: str, name: str) -> None:
        if process.wait():
            for other, _, _ in running:
                other.kill()
            raise SystemExit(f"{name}: the run failed (exit {process.returncode})")
        result = json.loads((args.runs / f"{name}.json").read_text())
        results.setdefault(method, []).append(result)
        print(
            f"{name}: zero-shot {result.get('zeroshot_top1', 0):.3f}, "
            f"R@5 {result.get('text_to_image_recall@5', 0):.3f}, "
            f"{result['samples_per_s']:.0f} samples/s, {result['seconds']:.0f} s",
            flush=True,
        )

    for method, seed, name in planned:
        if len(running) >= max(1, args.jobs):
            finish(*running.pop(0))  # in the planned order, so the table's rows are too
        process = subprocess.Popen(
            [sys.executable, __file__, "--method", method, "--seed", str(seed),
             "--run-dir", str(args.runs / name), "--result", str(args.runs / f"{name}.json"),
             "--samples", str(args.samples), "--model", args.model, "--lr", str(args.lr),
             "--lr-scaling", args.lr_scaling,
             "--data", str(args.data), "--train-shards", str(args.train_shards),
             "--samples-per-shard", str(args.samples_per_shard), "--palette", args.palette],
            cwd=ROOT,
        )  # fmt: skip
        running.append((process, method, name))
    while running:
        finish(*running.pop(0))
    if methods:
        print(
            f"\n{args.samples} samples per run, model {args.model}, seeds {args.seeds}, "
            f"palette {args.palette}, lr {args.lr} at batch 32, scaled: {args.lr_scaling}, "
            f"{args.jobs} run(s) at a time, {time.perf_counter() - started:.0f} s in all"
        )
    if args.merge:
        print(f"\nwith the runs of {', '.join(map(str, args.merge))}")
    print()
    relations = any(method.startswith("hard-neg") for method in results)
    # the gap's columns unless only hard negatives against plain b32 ran; both when both did
    if not relations or "plain b256" in results:
        print(table(results, COLUMNS), end="\n\n")
    if relations:
        print(table(results, RELATION_COLUMNS), end="\n\n")
    for line in verdicts(results) + (relation_verdicts(results) if relations else []):
        print(line)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
