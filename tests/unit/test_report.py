"""train.report on metrics files written by the real MetricsLogger: summary figures and the PNG."""

import json

import pytest
from PIL import Image

from train.metrics import MetricsLogger
from train.report import main, read_run, summarize


def write_run(run_dir):
    """A 2-rank run logged every 10 steps, evaluated at 20 and 40, resumed once at step 20."""
    metrics = MetricsLogger(run_dir, enabled=True, tensorboard=False)
    speeds = {10: 50.0, 20: 210.0, 30: 190.0, 40: 200.0}
    for step in (10, 20, 30):
        metrics.log(step, train_record(step, speeds[step], loss=5.0 - step / 10))
    metrics.log_eval(20, {"samples": 100.0, "zeroshot_top1": 0.5, "zeroshot_chance": 0.1})
    # killed after step 30, resumed from the step-20 checkpoint: step 30 is logged again
    metrics.log(30, train_record(30, 180.0, loss=1.5, skipped=3))
    metrics.log(40, train_record(40, speeds[40], loss=1.0, skipped=3))
    metrics.log_eval(
        40, {"samples": 100.0, "zeroshot_top1": 0.4, "zeroshot_chance": 0.1}, final=True
    )
    metrics.close()
    (run_dir / "config.json").write_text(json.dumps({"steps": 40}))


def train_record(step, samples_per_s, *, loss, skipped=0):
    record = {
        "loss": loss,
        "temperature": 0.07,
        "lr": 1e-3 / step,
        "samples_per_s": samples_per_s,
        "samples_per_s_per_rank": samples_per_s / 2,
        "world_size": 2,
        "global_batch": 64,
        "skipped_samples": skipped,
    }
    if skipped:
        record["skipped/corrupt_image"] = skipped
    return record


def test_summary_figures(tmp_path):
    write_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "train/lo')  # the torn last line of a killed run
    run = read_run(tmp_path)
    assert [r["step"] for r in run.train] == [10, 20, 30, 40]
    assert run.train[2]["loss"] == 1.5  # the resumed run's record wins
    summary = summarize(run)
    assert summary["steps"] == 40 and summary["planned_steps"] == 40
    assert summary["final_loss"] == 1.0 and summary["min_loss"] == 1.0
    assert summary["samples_per_s"] == 200.0  # median of 210, 180, 200: the first window is out
    assert summary["samples_per_s_per_rank"] == 100.0
    assert summary["skipped_samples"] == 3
    assert summary["skipped_by_reason"] == {"corrupt_image": 3}
    assert summary["evaluations"] == 2
    assert summary["final_eval"] == {"step": 40, "zeroshot_top1": 0.4}
    assert summary["best_eval"] == {"zeroshot_top1": {"value": 0.5, "step": 20}}
    assert json.loads((tmp_path / "eval.json").read_text())["zeroshot_top1"] == 0.4


def test_cli_draws_a_png_and_prints_the_summary(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    out = tmp_path / "curves" / "run.png"
    summary = main([str(run), "--out", str(out)])
    with Image.open(out) as image:
        image.load()  # decodes the whole file
        assert image.format == "PNG" and image.width > 500 and image.height > 300
    text = capsys.readouterr().out
    assert "steps:              40 of 40" in text
    assert "samples/s:          200 (100 per rank)" in text
    assert "skipped samples:    3 (corrupt_image 3)" in text
    assert "zeroshot_top1" in text and summary["best_eval"]["zeroshot_top1"]["step"] == 20


def test_a_run_without_evaluations_still_reports(tmp_path, capsys):
    metrics = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    metrics.log(5, train_record(5, 100.0, loss=3.0))
    metrics.close()
    main([str(tmp_path)])
    assert "evaluation:         none yet" in capsys.readouterr().out
    assert (tmp_path / "report.png").stat().st_size > 0


def test_not_a_run_directory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path)])
    assert exc.value.code == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_compositional_figures_are_reported_next_to_zeroshot(tmp_path, capsys):
    metrics = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step, swap in ((10, 0.6), (20, 0.7)):
        metrics.log(step, train_record(step, 100.0, loss=3.0 - step / 10))
        metrics.log_eval(
            step,
            {
                "samples": 100.0,
                "zeroshot_top1": 0.3,
                "zeroshot_top1_held_out": 0.1,
                "zeroshot_held_out_samples": 50.0,
                "compositional_swap_attribute": swap,
                "compositional_replace_relation": 0.55,
                "compositional_samples": 100.0,
            },
            final=step == 20,
        )
    metrics.close()
    summary = main([str(tmp_path)])
    assert summary["final_eval"] == {
        "step": 20,
        "zeroshot_top1": 0.3,
        "zeroshot_top1_held_out": 0.1,
        "compositional_swap_attribute": 0.7,
        "compositional_replace_relation": 0.55,
    }  # counts of samples are bookkeeping, not figures of the model
    assert summary["best_eval"]["compositional_swap_attribute"] == {"value": 0.7, "step": 20}
    text = capsys.readouterr().out
    assert "hard-neg. chance:   0.5" in text
    assert "compositional_replace_relation" in text and "zeroshot_top1_held_out" in text
    with Image.open(tmp_path / "report.png") as image:
        assert image.width > 1500  # the fourth column holds the hard-negative panel
