"""Config tree: typed `--set` overrides, validation naming the field, dict round trip."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import apply_overrides, from_dict, to_dict
from tests.conftest import REPO_ROOT, subprocess_env
from train.__main__ import parse_args
from train.config import RECIPES, TrainConfig
from train.resume import config_changes


def test_overrides_parse_each_field_type():
    cfg = apply_overrides(
        TrainConfig(),
        [
            "steps=12",
            "optim.lr=3e-4",
            "logging.progress=false",
            "eval.recall_at=1,3",
            "model.name=duet-micro",
            "data.train_shards=a/{0..3}.tar::b.tar",
            "data.augment.crop_scale_min=0.5",
            "data.augment.color_jitter=0.8,0.8,0.8,0.2",
            "data.augment.re_mode=const",
        ],
    )
    assert cfg.steps == 12 and cfg.optim.lr == 3e-4 and cfg.logging.progress is False
    assert cfg.eval.recall_at == (1, 3) and cfg.model.name == "duet-micro"
    assert cfg.data.train_shards == "a/{0..3}.tar::b.tar"  # only the first '=' splits
    augment = cfg.data.augment
    assert augment.crop_scale_min == 0.5 and augment.color_jitter == (0.8, 0.8, 0.8, 0.2)
    assert augment.re_mode == "const" and augment.augmentation.crop_scale == (0.5, 1.0)


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("optim.lrr=1", "unknown config field 'optim.lrr': optim has accum_steps, beta1"),
        ("steps=many", "cannot set steps='many'"),
        ("logging.progress=maybe", "expected a boolean"),
        ("optim=1", "'optim' is a section"),
        ("steps", "must look like section.field=value"),
        ("steps=0", "steps: must be >= 1"),
        ("data.batch_size_per_rank=0", "data.batch_size_per_rank: must be >= 1"),
        ("optim.lr=inf", "optim.lr: must be a finite number, got inf"),
        ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
        ("optim.weight_decay=inf", "optim.weight_decay: must be a finite number"),
        ("optim.eps=-1", "optim.eps: must be > 0"),
        ("optim.beta2=1", "optim.beta2: must be in [0, 1)"),
        ("optim.grad_clip_norm=inf", "optim.grad_clip_norm: must be a finite number"),
        ("loss.max_logit_scale=inf", "loss.max_logit_scale: must be a finite number"),
        ("loss.init_temperature=nan", "loss.init_temperature: must be in"),
        ("data.augment=1", "'data.augment' is a section"),
        ("data.augment.blur=1", "unknown config field 'data.augment.blur': data.augment has "),
        ("data.augment.crop_scale_min=0", "data.augment.crop_scale_min: must be in (0, 1]"),
        ("data.augment.crop_scale_max=1.5", "data.augment.crop_scale_max: must be in (0, 1]"),
        ("data.augment.crop_scale_min=nan", "data.augment.crop_scale_min: must be a finite"),
        ("data.augment.crop_ratio_min=2", "data.augment.crop_ratio_min: must be <= crop_ratio_max"),
        ("data.augment.crop_ratio_max=inf", "data.augment.crop_ratio_max: must be a finite"),
        ("data.augment.blur_sigma_min=0", "data.augment.blur_sigma_min: must be > 0"),
        ("data.augment.blur_sigma_min=3", "data.augment.blur_sigma_min: must be <= blur_sigma_max"),
        ("data.augment.blur_prob=1.5", "data.augment.blur_prob: must be in [0, 1]"),
        ("data.augment.re_prob=nan", "data.augment.re_prob: must be in [0, 1]"),
        ("data.augment.gray_scale_prob=-0.1", "data.augment.gray_scale_prob: must be in [0, 1]"),
        ("data.augment.color_jitter_prob=2", "data.augment.color_jitter_prob: must be in [0, 1]"),
        ("data.augment.color_jitter=0.4,0.4,0.4", "data.augment.color_jitter: must be 4 numbers"),
        ("data.augment.color_jitter=0.4,-1,0.4,0.1", "data.augment.color_jitter: every strength"),
        ("data.augment.color_jitter=0.4,0.4,0.4,0.6", "data.augment.color_jitter: the hue"),
        ("data.augment.re_mode=zeros", "data.augment.re_mode: must be one of const, rand, pixel"),
        ("data.augment.re_count=0", "data.augment.re_count: must be >= 1"),
    ],
)
def test_bad_overrides_name_the_field(assignment, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_overrides(TrainConfig(), [assignment])


def test_round_trip_through_dict():
    cfg = apply_overrides(
        RECIPES["smoke"](), ["eval.recall_at=2,4", "data.augment.color_jitter=0.8,0.8,0.8,0.2"]
    )
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        from_dict(TrainConfig, {**to_dict(cfg), "nope": 1})


def test_a_checkpoint_without_augment_settings_had_the_default_augmentation():
    """A config saved before data.augment existed reads as the default; a change shows as one."""
    saved = to_dict(TrainConfig())
    del saved["data"]["augment"]
    assert from_dict(TrainConfig, saved) == TrainConfig()
    cfg = apply_overrides(TrainConfig(), ["data.augment.blur_prob=0.5"])
    assert config_changes(saved, cfg) == {"data.augment.blur_prob": (0.0, 0.5)}


def test_cli_reports_bad_overrides_as_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--recipe", "smoke", "--set", "optim.lr=-1"])
    assert exit_info.value.code == 2
    assert "optim.lr: must be > 0" in capsys.readouterr().err
    cfg, options = parse_args(["--recipe", "demo", "--set", "steps=5", "--resume"])
    assert cfg.steps == 5 and options.resume is True and cfg.run_dir == "runs/demo"
    _, options = parse_args(["--recipe", "demo", "--resume", "runs/x/last-good.pt"])
    assert options.resume == Path("runs/x/last-good.pt")
    _, options = parse_args(["--recipe", "demo", "--resume-step", "300"])
    assert options.resume == Path("runs/demo/checkpoints/step-00000300.pt")
    assert parse_args(["--recipe", "demo", "--overwrite"])[1].overwrite
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "demo", "--resume", "--overwrite"])


@pytest.mark.parametrize(
    "field, message",
    [
        ("data.train_shards", "4 of 4 shards not found"),
        ("data.val_shards", "data.val_shards: 4 of 4 shards not found"),
        ("data.zeroshot_file", "data.zeroshot_file: '"),
    ],
)
def test_training_with_missing_inputs_exits_before_the_first_step(
    tmp_path, synth_dir, caplog, field, message
):
    from train.__main__ import main

    inputs = {
        "data.train_shards": f"{synth_dir}/train/shard-{{000000..000007}}.tar",
        "data.val_shards": f"{synth_dir}/val/shard-{{000000..000001}}.tar",
        "data.zeroshot_file": f"{synth_dir}/zeroshot.json",
        field: f"{tmp_path}/nope-{{0..3}}.tar",  # the default recipe's paths, never made here
    }
    with pytest.raises(SystemExit) as exit_info:
        main(["--recipe", "smoke", "--set", f"run_dir={tmp_path}"] + [
            f"--set={name}={value}" for name, value in inputs.items()
        ])  # fmt: skip
    assert exit_info.value.code == 2
    assert message in caplog.text


def test_failures_end_in_one_line_and_the_traceback_goes_to_the_log(tmp_path, synth_dir):
    """A failure at start (exit 2) and one while running (exit 1): one ERROR line each on the
    console, no traceback there; the traceback is in RUN_DIR/logs/rank-0.log."""
    shards = f"data.train_shards={synth_dir}/train/shard-{{000000..000001}}.tar"
    base = [
        "--recipe",
        "smoke",
        "--set",
        shards,
        "--set",
        "data.val_shards=",
        "--set",
        "data.zeroshot_file=",
    ]
    cases = [
        (["--set", "data.batch_size_per_rank=600"], 1, "epoch 0 produced no full batch of 600"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--set", "device=cuda"], 2, "device=cuda was asked for"))
    for i, (args, code, message) in enumerate(cases):
        run_dir = tmp_path / str(i)
        result = subprocess.run(
            [sys.executable, "-m", "train", *base, "--set", f"run_dir={run_dir}", *args],
            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
        assert result.returncode == code and len(errors) == 1, result.stderr
        assert message in errors[0] and "Traceback" not in result.stderr
        if code == 1:
            assert "Traceback" in (run_dir / "logs" / "rank-0.log").read_text()
