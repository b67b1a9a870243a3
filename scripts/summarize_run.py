"""Print a finished run's held-out metrics and training throughput (used by `make demo`)."""

import json
import statistics
import sys
from pathlib import Path


def main(run_dir: str) -> None:
    run = Path(run_dir)
    ev = json.loads((run / "eval.json").read_text())
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    speeds = [r["train/samples_per_s"] for r in records if "train/samples_per_s" in r]
    print(f"held-out samples:       {int(ev['samples'])}")
    print(f"zero-shot top-1:        {ev['zeroshot_top1']:.3f} (chance {ev['zeroshot_chance']:.3f})")
    print(f"text->image recall@5:   {ev['text_to_image_recall@5']:.3f}")
    print(f"image->text recall@5:   {ev['image_to_text_recall@5']:.3f}")
    if speeds:
        print(f"training samples/s:     {statistics.median(speeds):.0f} (median over log windows)")


if __name__ == "__main__":
    main(sys.argv[1])
