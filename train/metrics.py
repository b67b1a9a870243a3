"""One metrics sink for a run: JSONL in the run directory plus TensorBoard, on rank 0 only; and
the timings of the steps between two records (`StepWindow`).

RUN_DIR/metrics.jsonl   every record: {"step", "time", "train/loss", ...} or {"eval/...": ...}
RUN_DIR/eval.jsonl      one line per evaluation: {"step", "time", "samples", "zeroshot_top1", ...}
RUN_DIR/eval.json       the final evaluation
RUN_DIR/tensorboard/    the same scalars, for TensorBoard
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    """`log(step, {name: value})` appends a JSON line and writes TensorBoard scalars."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self._file = None
        self._writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # line-buffered, kept open for the run (closed in close())
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, Any], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {
            "step": step,
            "time": round(time.time(), 3),
            **{f"{prefix}/{k}": v for k, v in values.items()},
        }
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def log_eval(self, step: int, results: dict[str, float], *, final: bool = False) -> None:
        """An evaluation: metrics.jsonl + TensorBoard (prefix eval/), a line of eval.jsonl, and
        for the final one eval.json, so a run's eval curve is readable without parsing all logs."""
        self.log(step, results, prefix="eval")
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **results}
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if final:
            (self.run_dir / "eval.json").write_text(json.dumps(record, indent=2) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()


@dataclass(slots=True)
class StepWindow:
    """Timings of the steps since the last metrics record, and that record's values."""

    start: float = field(default_factory=time.perf_counter)
    data_wait_s: list[float] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self, global_batch: int) -> dict[str, float]:
        """samples/s, and the wait for input per step: mean, max, share of the window's time."""
        elapsed = time.perf_counter() - self.start
        waited = sum(self.data_wait_s)
        return {
            "samples_per_s": len(self.data_wait_s) * global_batch / elapsed,
            "data_wait_s": waited / len(self.data_wait_s),
            "data_wait_max_s": max(self.data_wait_s),
            "data_wait_fraction": waited / elapsed,
        }

    def postfix(self) -> dict[str, str]:
        """The progress bar's: the last record's loss and samples/s, this step's input wait."""
        shown = {"data": f"{self.data_wait_s[-1]:.3f}s"}
        if self.stats:
            shown["loss"] = f"{self.stats['loss']:.3f}"
            shown["samples_per_s"] = f"{self.stats['samples_per_s']:.0f}"
        return shown
