"""Precision (bf16 on CPU, fp16 on GPU only) and the speed switches of the training step."""

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from common.config import apply_overrides
from common.model import build_model
from common.preprocess import tokenizer
from tests.conftest import micro_models, micro_step_inputs
from train import checkpoint
from train.compute import Precision, has_conv_image_tower, prepare_model, uses_channels_last
from train.config import ComputeConfig, LossConfig, TrainConfig, smoke
from train.distributed import DistInfo
from train.objective import Inputs, StepLoss
from train.step import grad_cache, one_pass
from train.trainer import Trainer

CPU = torch.device("cpu")
ONE = DistInfo(0, 1, 0, CPU)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def trainer_config(synth_dir: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    return apply_overrides(
        smoke(),
        [
            f"run_dir={run_dir}",
            f"data.train_shards={synth_dir}/train/shard-{{000000..000007}}.tar",
            "data.val_shards=",
            "data.zeroshot_file=",
            "data.batch_size_per_rank=8",
            "logging.tensorboard=false",
            "optim.warmup_steps=0",
            *overrides,
        ],
    )


def test_fp16_on_cpu_is_a_config_error():
    with pytest.raises(ValueError, match="compute.precision: fp16 needs a CUDA device"):
        apply_overrides(TrainConfig(), ["device=cpu", "compute.precision=fp16"])
    with pytest.raises(ValueError, match="compute.precision: must be one of fp32, bf16, fp16"):
        apply_overrides(TrainConfig(), ["compute.precision=fp8"])
    # device=auto that finds no GPU: the trainer's Precision says so
    with pytest.raises(ValueError, match="fp16 needs a CUDA device.*use bf16 on CPU"):
        Precision("fp16", CPU)


def test_bf16_trains_on_cpu(synth_dir: Path, tmp_path: Path):
    cfg = trainer_config(synth_dir, tmp_path / "run", "device=cpu", "compute.precision=bf16")
    trainer = Trainer(cfg)
    try:
        batch = next(iter(trainer.batches))
        losses = []
        for _ in range(4):  # the same batch: its loss must go down
            losses.append(trainer.train_step(batch).item())
            trainer.step += 1
    finally:
        trainer.close()
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    assert trainer.guard.skipped == 0
    assert trainer.precision.state_dict() == {}  # bf16 needs no loss scale
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_grad_checkpointing_gives_the_same_gradients():
    cfg = LossConfig(kind="clip")
    images, tokens = micro_step_inputs()
    models = micro_models(ComputeConfig(), ComputeConfig(grad_checkpointing=True))
    assert models[1].clip.transformer.grad_checkpointing
    assert not models[0].clip.transformer.grad_checkpointing
    fp32 = Precision("fp32", CPU)
    assert_close(
        one_pass(models[0], Inputs(images, tokens), StepLoss(cfg, ONE), fp32),
        grad_cache(models[1], Inputs(images, tokens), StepLoss(cfg, ONE), fp32, 4),  # combined
    )
    reference = dict(models[0].named_parameters())
    for name, param in models[1].named_parameters():
        assert_close(param.grad, reference[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_only_for_conv_towers_on_gpu():
    tiny, micro = build_model("duet-tiny"), build_model("duet-micro")
    assert has_conv_image_tower(tiny) and not has_conv_image_tower(micro)  # ResNet vs ViT
    on = ComputeConfig(channels_last=True)
    assert not uses_channels_last(tiny, on, CPU)
    assert uses_channels_last(tiny, on, torch.device("cuda"))
    assert not uses_channels_last(micro, on, torch.device("cuda"))
    assert not uses_channels_last(tiny, ComputeConfig(channels_last=False), torch.device("cuda"))


@needs_cuda
def test_fp16_with_loss_scaling_trains_on_gpu(synth_dir: Path, tmp_path: Path):
    cfg = trainer_config(synth_dir, tmp_path / "run", "device=cuda", "compute.precision=fp16")
    trainer = Trainer(cfg)
    try:
        batch = next(iter(trainer.batches))
        losses = []
        for _ in range(6):
            losses.append(trainer.train_step(batch).item())
            trainer.step += 1
        trainer.save()
    finally:
        trainer.close()
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    state, _ = checkpoint.load_latest(tmp_path / "run" / "checkpoints")
    assert state["scaler"]["scale"] == trainer.precision.loss_scale > 0  # resumable
    assert trainer.guard.skipped == 0  # overflows back the scale off; they are not failures


@needs_cuda
def test_channels_last_conv_tower_gives_the_same_step_on_gpu():
    cfg = LossConfig(kind="clip")
    cuda = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=g).to(cuda)
    tokens = tokenizer("duet-tiny")([f"a {c} shape" for c in "abcdefgh"]).to(cuda)
    losses, grads = [], []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_model("duet-tiny", device=cuda)
        prepare_model(model, ComputeConfig(channels_last=channels_last), cuda)
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        losses.append(
            one_pass(
                model,
                Inputs(x, tokens),
                StepLoss(cfg, DistInfo(0, 1, 0, cuda)),
                Precision("fp32", cuda),
            )
        )
        grads.append(model.clip.visual.conv1.weight.grad)
        if channels_last:
            assert model.clip.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)
