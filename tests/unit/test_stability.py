"""Non-finite steps are skipped and counted, K in a row stop the run, NaN is never checkpointed."""

import json
import math
from pathlib import Path

import pytest
import torch

from common.config import validate
from train import checkpoint
from train.config import TrainConfig, smoke
from train.trainer import Trainer


def trainer_config(synth_dir: Path, run_dir: Path, **optim: int) -> TrainConfig:
    cfg = smoke()
    cfg.run_dir, cfg.device = str(run_dir), "cpu"
    cfg.data.train_shards = f"{synth_dir}/train/shard-{{000000..000007}}.tar"
    cfg.data.val_shards = cfg.data.zeroshot_file = ""
    cfg.data.batch_size_per_rank, cfg.data.shuffle_buffer = 8, 0
    cfg.logging.tensorboard = False
    for name, value in optim.items():
        setattr(cfg.optim, name, value)
    validate(cfg)
    return cfg


@pytest.fixture
def trainer(synth_dir: Path, tmp_path: Path):
    trainer = Trainer(trainer_config(synth_dir, tmp_path / "run", max_consecutive_nonfinite=3))
    try:
        yield trainer
    finally:
        trainer.close()


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_a_non_finite_gradient_skips_the_step_and_training_goes_on(trainer: Trainer):
    batch = next(iter(trainer.batches))
    projection = trainer.model.clip.text_projection
    hook = projection.register_hook(lambda g: g * math.inf)  # finite loss, inf gradient
    before = weights(trainer)
    loss = trainer.train_step(batch)
    assert math.isfinite(loss.item())
    assert trainer.guard.skipped == 1 and trainer.guard.consecutive == 1
    assert all(p.grad is None for p in trainer.model.parameters())  # gradients dropped
    assert not trainer.optimizer.state  # no optimizer step ...
    assert trainer.scheduler.last_epoch == 0  # ... and no scheduler step
    for name, value in weights(trainer).items():
        assert torch.equal(value, before[name]), name

    hook.remove()
    trainer.train_step(batch)
    assert trainer.guard.skipped == 1 and trainer.guard.consecutive == 0
    assert trainer.scheduler.last_epoch == 1
    assert not torch.equal(projection.detach(), before["clip.text_projection"])


def test_consecutive_non_finite_losses_stop_the_run_naming_the_steps(trainer: Trainer):
    batch = next(iter(trainer.batches))
    with torch.no_grad():
        trainer.model.clip.text_projection[0, 0] = math.nan  # every loss from now on is NaN
    trainer.step = 4  # steps 5 and 6 are skipped, step 7 is the third in a row
    for _ in range(2):
        assert math.isnan(trainer.train_step(batch).item())
        trainer.step += 1
    assert trainer.guard.skipped == 2
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps \(5\.\.7"):
        trainer.train_step(batch)
    assert trainer.guard.skipped == 3


def test_a_non_finite_model_is_never_checkpointed(trainer: Trainer):
    trainer.step = 10
    with torch.no_grad():
        trainer.model.clip.logit_scale.fill_(math.inf)
    with pytest.raises(FloatingPointError, match="non-finite parameters at step 10"):
        trainer.save()
    assert not list(trainer.ckpt_dir.glob("*.pt"))
    with torch.no_grad():
        trainer.model.clip.logit_scale.fill_(1.0)
    trainer.save()  # the guard is about NaN, not about saving
    state, _ = checkpoint.load_latest(trainer.ckpt_dir)
    assert state["step"] == 10 and state["scaler"] == {}  # fp32: no loss scale to resume


def test_the_skip_count_is_logged(synth_dir: Path, tmp_path: Path):
    cfg = trainer_config(synth_dir, tmp_path / "run", max_consecutive_nonfinite=3)
    cfg.steps, cfg.logging.every_steps = 3, 3
    trainer = Trainer(cfg)
    try:
        trainer.model.clip.text_projection.register_hook(
            lambda g: g * math.nan if trainer.step == 1 else g  # only the second step
        )
        trainer.train()
    finally:
        trainer.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    stats = next(json.loads(line) for line in lines if '"train/loss"' in line)
    assert stats["step"] == 3
    assert stats["train/nonfinite_skipped"] == 1
    assert math.isfinite(stats["train/grad_norm"])
