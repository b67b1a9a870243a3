"""Two gloo processes with DDP apply exactly the one-process gradient of the global batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from common.model import build_model
from common.preprocess import tokenizer
from train.config import LossConfig
from train.distributed import DistInfo, contrastive_loss, wrap_model

WORLD = 2
PER_RANK = 6


def global_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(WORLD * PER_RANK, 3, 32, 32, generator=g)
    words = ["red", "green", "blue", "circle", "square", "star", "small", "large", "top", "left"]
    captions = [
        " ".join(words[(i * 3 + j) % len(words)] for j in range(3)) for i in range(WORLD * PER_RANK)
    ]
    return images, tokenizer("duet-micro")(captions)


# block_size 4 with 6 samples per rank: the rank's row and column stripes cut blocks unevenly
CLIP = LossConfig(kind="clip", implementation="tiled", block_size=4)
SIGLIP = LossConfig(kind="siglip", implementation="tiled", block_size=4)


def fresh_model(cfg: LossConfig):
    torch.manual_seed(123)
    return build_model(
        "duet-micro", init_logit_scale=cfg.init_logit_scale, init_logit_bias=cfg.init_logit_bias
    )


def worker(rank: int, port: int, out_dir: str, cfg: LossConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        info = DistInfo(rank, WORLD, rank, torch.device("cpu"))
        model = fresh_model(cfg)
        ddp = wrap_model(model, info)
        images, tokens = global_batch()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        loss = contrastive_loss(ddp, images[rows], tokens[rows], info, cfg)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_two_processes_equal_one(tmp_path, cfg: LossConfig, temperature_params: list[str]):
    mp.spawn(worker, args=(free_port(), str(tmp_path), cfg), nprocs=WORLD, join=True)

    model = fresh_model(cfg)
    images, tokens = global_batch()
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    reference_loss = contrastive_loss(model, images, tokens, info, cfg)
    reference_loss.backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # the ranks' losses average to the global loss ...
    assert_close(sum(r["loss"] for r in results) / WORLD, reference_loss.detach())
    # ... and after DDP's averaging each rank holds the global batch's gradient, for every
    # parameter including the temperature (and SigLIP's bias)
    assert set(temperature_params) <= reference.keys()
    for r in results:
        assert r["grads"].keys() == reference.keys()
        for name, grad in reference.items():
            assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_process_gradients_equal_single_process(tmp_path):
    assert_two_processes_equal_one(tmp_path, CLIP, ["clip.logit_scale"])


@pytest.mark.slow
def test_two_process_siglip_gradients_equal_single_process(tmp_path):
    assert fresh_model(SIGLIP).clip.logit_bias.item() == -10.0  # SigLIP's init: t = log 10, b = -10
    assert_two_processes_equal_one(tmp_path, SIGLIP, ["clip.logit_scale", "clip.logit_bias"])
