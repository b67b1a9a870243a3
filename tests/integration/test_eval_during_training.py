"""Evaluation every K steps under torchrun (2 gloo processes), and train.report on that run."""

import json

import pytest
from PIL import Image

from tests.conftest import data_overrides, run_torchrun
from train.report import main as report_main

pytestmark = pytest.mark.slow


def test_periodic_eval_under_torchrun_and_the_report(tmp_path, synth_dir, capsys):
    run = tmp_path / "run"
    run_torchrun(
        2,
        "--recipe",
        "smoke",
        "--set",
        f"run_dir={run}",
        "--set",
        "steps=20",
        "--set",
        "eval.every_steps=10",
        "--set",
        "eval.chunk_rows=64",
        *data_overrides(synth_dir),
    )
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    # step 10 in the loop, step 20 once: the loop's evaluation at the last step is the final one
    assert [e["step"] for e in evals] == [10, 20]
    assert json.loads((run / "eval.json").read_text()) == evals[-1]
    for e in evals:
        assert e["samples"] == 500 and e["zeroshot_samples"] == 500
        assert 0 <= e["zeroshot_top1"] <= e["zeroshot_top5"] <= 1
        assert 0 <= e["text_to_image_recall@1"] <= e["text_to_image_recall@10"] <= 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/zeroshot_top1" in r] == [10, 20]
    train = [r for r in records if "train/loss" in r]
    assert {(r["train/world_size"], r["train/global_batch"]) for r in train} == {(2, 64)}

    summary = report_main([str(run)])
    assert summary["steps"] == 20 and summary["world_size"] == 2
    assert summary["final_loss"] == train[-1]["train/loss"]
    assert summary["final_eval"]["zeroshot_top5"] == evals[-1]["zeroshot_top5"]
    assert summary["samples_per_s"] > 0
    with Image.open(run / "report.png") as image:
        image.load()
        assert image.format == "PNG"
    assert "evaluations:        2, the last at step 20" in capsys.readouterr().out
