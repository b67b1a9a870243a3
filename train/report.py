"""Seeing a run: its curves drawn to a PNG and its figures summarised as text.

    python -m train.report RUN_DIR [--out PNG]

Reads what the trainer wrote to RUN_DIR (metrics.jsonl, eval.jsonl, config.json; see
train/metrics.py) and draws loss, temperature, learning rate, throughput and the evaluation
curves (default RUN_DIR/report.png), then prints steps, final loss, best and final evaluation,
samples/s and skipped samples. It reads files only, so it works on a run that is still going.
Runs evaluated on compositional data (`train.synth --kind compositional`) also get a panel and
table rows for their hard-negative accuracies (`compositional_<kind>`, chance 0.5).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# eval figures that describe the evaluation rather than the model: not curves, not "best"
EVAL_BOOKKEEPING = (
    "samples",
    "skipped_samples",
    "zeroshot_chance",
    "zeroshot_samples",
    "zeroshot_held_out_samples",
    "compositional_samples",
    "seconds",
)
COMPOSITIONAL_PREFIX = "compositional_"  # hard-negative accuracies: true vs one false caption
COMPOSITIONAL_CHANCE = 0.5


@dataclass(slots=True)
class RunRecords:
    """A run's records, one per step (the latest wins where a resumed run logged a step again)."""

    train: list[dict[str, Any]]  # {"step", "loss", "lr", ...}, by step
    evals: list[dict[str, Any]]  # {"step", "zeroshot_top1", ...}, by step
    config: dict[str, Any] = field(default_factory=dict)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line of a killed run is skipped with a warning."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: not a JSON record, skipped", path, number)
    return records


def _by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    latest = {int(r["step"]): r for r in records}
    return [latest[s] for s in sorted(latest)]


def _unprefixed(record: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    values = {k.removeprefix(prefix): v for k, v in record.items() if k.startswith(prefix)}
    return {"step": record["step"], **values} if values else None


def read_run(run_dir: str | Path) -> RunRecords:
    """Load RUN_DIR's records; evaluations from eval.jsonl, else metrics.jsonl's eval/ lines."""
    run = Path(run_dir)
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no metrics.jsonl)")
    records = _read_jsonl(metrics_path)
    train = [t for r in records if (t := _unprefixed(r, "train/")) is not None]
    if (run / "eval.jsonl").is_file():
        evals = _read_jsonl(run / "eval.jsonl")
    else:
        evals = [e for r in records if (e := _unprefixed(r, "eval/")) is not None]
    config_path = run / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return RunRecords(_by_step(train), _by_step(evals), config)


def eval_curves(evals: list[dict[str, Any]]) -> list[str]:
    """The names of the model's evaluation figures (recall@k, zero-shot top-k), in log order."""
    names: list[str] = []
    for record in evals:
        for name, value in record.items():
            skip = name in ("step", "time", *EVAL_BOOKKEEPING) or not isinstance(value, int | float)
            if not skip and name not in names:
                names.append(name)
    return names


def summarize(run: RunRecords) -> dict[str, Any]:
    """The run's figures: steps, final loss, samples/s, skipped samples, best and final eval.

    Samples/s is the median over the logging windows after the first, which holds start-up
    (data workers starting, first-step allocations); windows that hold a checkpoint or an
    evaluation are slower, and the median does not follow them.
    """
    if not run.train:
        raise ValueError("the run has no training records yet")
    last = run.train[-1]
    speeds = [r["samples_per_s"] for r in run.train if "samples_per_s" in r]
    steady = speeds[1:] or speeds
    summary: dict[str, Any] = {
        "steps": last["step"],
        "planned_steps": run.config.get("steps"),
        "world_size": last.get("world_size"),
        "global_batch": last.get("global_batch"),
        "final_loss": last.get("loss"),
        "min_loss": min(r["loss"] for r in run.train if "loss" in r),
        "final_temperature": last.get("temperature"),
        "samples_per_s": statistics.median(steady) if steady else None,
        "skipped_samples": last.get("skipped_samples", 0),
        "skipped_by_reason": {
            k.removeprefix("skipped/"): v for k, v in last.items() if k.startswith("skipped/")
        },
        "evaluations": len(run.evals),
        "final_eval": {},
        "best_eval": {},
    }
    if summary["world_size"] and summary["samples_per_s"] is not None:
        summary["samples_per_s_per_rank"] = summary["samples_per_s"] / summary["world_size"]
    if run.evals:
        final = run.evals[-1]
        names = eval_curves(run.evals)
        summary["final_eval"] = {
            "step": final["step"],
            **{n: final[n] for n in names if n in final},
        }
        for name in names:
            best = max((e for e in run.evals if name in e), key=lambda e: e[name])
            summary["best_eval"][name] = {"value": best[name], "step": best["step"]}
        if "zeroshot_chance" in final:
            summary["zeroshot_chance"] = final["zeroshot_chance"]
    return summary


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as aligned text lines, for the terminal."""
    planned = summary["planned_steps"]
    lines = [
        f"steps:              {summary['steps']}" + (f" of {planned}" if planned else ""),
        f"world size:         {summary['world_size']}, global batch {summary['global_batch']}",
        f"loss:               final {_fmt(summary['final_loss'])}, min {_fmt(summary['min_loss'])}",
        f"temperature:        {_fmt(summary['final_temperature'])}",
    ]
    if summary["samples_per_s"] is not None:
        per_rank = summary.get("samples_per_s_per_rank")
        lines.append(
            f"samples/s:          {summary['samples_per_s']:.0f}"
            + (f" ({per_rank:.0f} per rank)" if per_rank is not None else "")
            + " (median over logging windows after the first)"
        )
    skipped = summary["skipped_samples"]
    reasons = ", ".join(f"{k} {v}" for k, v in summary["skipped_by_reason"].items())
    lines.append(f"skipped samples:    {skipped}" + (f" ({reasons})" if reasons else ""))
    if not summary["evaluations"]:
        lines.append("evaluation:         none yet")
        return "\n".join(lines)
    final = summary["final_eval"]
    lines.append(f"evaluations:        {summary['evaluations']}, the last at step {final['step']}")
    if "zeroshot_chance" in summary:
        lines.append(f"zero-shot chance:   {_fmt(summary['zeroshot_chance'])}")
    if any(name.startswith(COMPOSITIONAL_PREFIX) for name in summary["best_eval"]):
        lines.append(f"hard-neg. chance:   {COMPOSITIONAL_CHANCE} (compositional_*)")
    width = max(len(n) for n in summary["best_eval"])
    lines.append(f"  {'metric':<{width}}  {'final':>8}  {'best':>8}  at step")
    for name, best in summary["best_eval"].items():
        lines.append(
            f"  {name:<{width}}  {_fmt(final.get(name, float('nan'))):>8}  "
            f"{_fmt(best['value']):>8}  {best['step']}"
        )
    return "\n".join(lines)


def _series(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), int | float)]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run: RunRecords, out: str | Path, *, title: str = "") -> Path:
    """Draw the six panels (loss, temperature, lr, samples/s, zero-shot, recall) to a PNG, and a
    seventh (hard-negative accuracy) for a run evaluated on compositional data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe on a headless node
    import matplotlib.pyplot as plt

    curves = eval_curves(run.evals)
    compositional = [n for n in curves if n.startswith(COMPOSITIONAL_PREFIX)]
    columns = 4 if compositional else 3
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), constrained_layout=True)
    panels: list[tuple[Any, list[dict[str, Any]], list[str], str]] = [
        (axes[0, 0], run.train, ["loss"], "training loss"),
        (axes[0, 1], run.train, ["temperature"], "temperature (1 / logit scale)"),
        (axes[0, 2], run.train, ["lr"], "learning rate"),
        (axes[1, 0], run.train, ["samples_per_s", "samples_per_s_per_rank"], "samples/s"),
        (axes[1, 1], run.evals, [n for n in curves if "zeroshot" in n], "zero-shot"),
        (axes[1, 2], run.evals, [n for n in curves if "recall" in n], "recall@k"),
    ]
    if compositional:
        panels.append((axes[0, 3], run.evals, compositional, "hard negatives"))
        axes[1, 3].axis("off")
    for ax, records, names, panel_title in panels:
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        drawn = 0
        for name in names:
            steps, values = _series(records, name)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
                drawn += 1
        if panel_title == "zero-shot" and run.evals and "zeroshot_chance" in run.evals[-1]:
            ax.axhline(run.evals[-1]["zeroshot_chance"], color="grey", ls="--", label="chance")
        if panel_title == "hard negatives":
            ax.axhline(COMPOSITIONAL_CHANCE, color="grey", ls="--", label="chance")
        if drawn > 1:
            ax.legend(fontsize="small")
        if not drawn:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run directory (the trainer's run_dir)")
    parser.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/report.png)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        run = read_run(args.run_dir)
        summary = summarize(run)
    except (ValueError, FileNotFoundError) as exc:
        print(f"python -m train.report: error: {exc}", file=sys.stderr)
        sys.exit(2)
    out = plot_run(run, args.out or args.run_dir / "report.png", title=str(args.run_dir))
    print(format_summary(summary))
    print(f"curves:             {out}")
    return summary


if __name__ == "__main__":
    main()
