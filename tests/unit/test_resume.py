"""Recovering from a blow-up: the checkpoint before it is kept, and a resume from it with a new
lr applies the lr; overrides the restored state would undo are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.config import apply_overrides, to_dict
from train.config import TrainConfig, smoke
from train.resume import check_changes, config_changes
from train.trainer import Trainer

BLOW_UP_STEPS = {5, 9, 10, 11}  # one stray non-finite step, then three in a row: the stop


def config(synth_dir: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    return apply_overrides(
        smoke(),
        [
            f"run_dir={run_dir}",
            "device=cpu",
            "steps=12",
            f"data.train_shards={synth_dir}/train/shard-{{000000..000007}}.tar",
            "data.val_shards=",
            "data.zeroshot_file=",
            "data.batch_size_per_rank=8",
            "data.shuffle_buffer=0",
            "logging.tensorboard=false",
            "logging.every_steps=1",
            "optim.warmup_steps=2",
            "optim.max_consecutive_nonfinite=3",
            "checkpoint.every_steps=2",
            "checkpoint.keep_last=1",
            *overrides,
        ],
    )


def test_a_blown_up_run_resumes_from_its_last_good_checkpoint_with_a_new_lr(synth_dir, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(config(synth_dir, run))
    projection = trainer.model.clip.text_projection
    projection.register_hook(lambda g: g * math.inf if trainer.step + 1 in BLOW_UP_STEPS else g)
    try:
        with pytest.raises(FloatingPointError, match=r"3 consecutive steps \(9\.\.11"):
            trainer.train()
    finally:
        trainer.close()
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*.pt")) == ["step-00000010.pt"]  # keep_last=1
    last_good = ckpt / "last-good.pt"
    assert torch.load(last_good, weights_only=False)["step"] == 4  # written before step 5

    resumed = Trainer(config(synth_dir, run, "optim.lr=5e-4"), resume=last_good)
    try:
        assert resumed.step == 4 and resumed.scheduler.base_lrs == [5e-4, 5e-4]
        assert (ckpt / "abandoned" / "step-00000010.pt").is_file()  # would outrank new ones
        resumed.train()
    finally:
        resumed.close()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in records if r["step"] > 4][-8:]  # the resumed run's steps 5..12
    assert [r["step"] for r in after] == list(range(5, 13))
    assert all(math.isfinite(r["train/loss"]) and r["train/lr"] <= 5e-4 for r in after)
    assert after[0]["train/data_wait_s"] >= 0 and "train/data_wait_fraction" in after[0]
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 5e-4
    assert sorted(p.name for p in ckpt.glob("step-*.pt")) == ["step-00000012.pt"]


def test_overrides_the_checkpoint_would_undo_are_refused(synth_dir, tmp_path):
    saved = to_dict(config(synth_dir, tmp_path))
    changes = config_changes(saved, config(synth_dir, tmp_path, "seed=3", "optim.lr=1e-4"))
    assert changes == {"seed": (0, 3), "optim.lr": (1e-3, 1e-4)}
    with pytest.raises(ValueError, match=r"cannot resume ckpt.pt with seed=3 \(checkpoint: 0\)"):
        check_changes(changes, Path("ckpt.pt"))
    check_changes({"optim.lr": (1e-3, 1e-4), "eval.every_steps": (0, 5)}, Path("ckpt.pt"))
