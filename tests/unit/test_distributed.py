"""Two gloo processes (DDP or FSDP, one pass or GradCache) apply exactly the one-process
gradient of the global batch."""

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from common.config import apply_overrides
from common.model import build_model
from common.preprocess import tokenizer
from tests.conftest import free_port
from train.compute import Precision
from train.config import LossConfig, smoke
from train.distributed import DistInfo, sync_replicated_grads, wrap_model
from train.negatives import GlobalDenominators, StepNegatives
from train.objective import Inputs, StepLoss, contrastive_loss
from train.stability import NonFiniteGuard, clip_grad_norm, model_is_finite
from train.step import forward_backward
from train.trainer import Trainer

WORLD = 2
PER_RANK = 6
ONE = DistInfo(0, 1, 0, torch.device("cpu"))


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
QUEUE = LossConfig(kind="clip", block_size=4, negatives="queue")
MOCO = LossConfig(kind="clip", block_size=4, negatives="queue", queue_batch_keys="momentum")
GLOBAL = LossConfig(kind="clip", block_size=4, negatives="global", global_gamma=0.5)
HARD = LossConfig(kind="clip", block_size=4, hard_negatives=True)
HARD_QUEUE = LossConfig(kind="clip", block_size=4, negatives="queue", hard_negatives=True)


def step_inputs(cfg: LossConfig, rows: slice = slice(None)) -> Inputs:
    """The global batch's rows; with hard negatives, 2 per sample, some of them padding (rank 1
    has more real ones than rank 0, so the gathered columns come unevenly from the ranks)."""
    images, tokens = global_batch()
    if not cfg.hard_negatives:
        return Inputs(images[rows], tokens[rows])
    n = WORLD * PER_RANK
    captions = [f"a {'blue' if i % 2 else 'red'} square left of a circle {i}" for i in range(n)]
    negatives = tokenizer("duet-micro")([c for c in captions for _ in (0, 1)]).unflatten(0, (n, 2))
    mask = torch.tensor([[i % 3 != 0, i >= PER_RANK and i % 2 == 0] for i in range(n)])
    return Inputs(images[rows], tokens[rows], negatives[rows], mask[rows])


def step_negatives(cfg: LossConfig, info: DistInfo) -> StepNegatives | None:
    """The same queue, keys, sample ids and earlier estimates, each rank with its share."""
    if cfg.negatives == "batch":
        return None
    g = torch.Generator().manual_seed(1)
    queue = torch.nn.functional.normalize(torch.randn(2, 5, 64, generator=g), dim=-1)
    keys = torch.nn.functional.normalize(torch.randn(2, WORLD * PER_RANK, 64, generator=g), dim=-1)
    ids = torch.randperm(20, generator=g)[: WORLD * PER_RANK]
    ids[3] = -1  # a sample without an id has no estimate
    estimates = GlobalDenominators(20, info)
    estimates.store(torch.arange(20), torch.randn(20, 2, generator=g))  # each keeps its own
    own = slice(info.rank * PER_RANK, (info.rank + 1) * PER_RANK) if info.enabled else slice(None)
    moco = cfg.queue_batch_keys == "momentum"
    return StepNegatives(
        queue_images=queue[0],
        queue_texts=queue[1],
        key_images=keys[0][own] if moco else None,
        key_texts=keys[1][own] if moco else None,
        ids=ids[own],
        denominators=estimates if cfg.negatives == "global" else None,
    )


def fresh_model(cfg: LossConfig):
    torch.manual_seed(123)
    return build_model(
        "duet-micro", init_logit_scale=cfg.init_logit_scale, init_logit_bias=cfg.init_logit_bias
    )


# Every case runs in one spawn of two processes (starting them costs more than the cases):
# name -> (loss config, parallelism, GradCache chunk, parameters that must have a gradient)
CASES = {
    "ddp_clip": (CLIP, "ddp", 0, ["clip.logit_scale"]),
    "ddp_siglip": (SIGLIP, "ddp", 0, ["clip.logit_scale", "clip.logit_bias"]),
    "ddp_grad_cache": (SIGLIP, "ddp", 4, ["clip.logit_scale", "clip.logit_bias"]),
    "fsdp_clip": (CLIP, "fsdp", 0, ["clip.logit_scale"]),
    "fsdp_grad_cache": (SIGLIP, "fsdp", 4, ["clip.logit_scale", "clip.logit_bias"]),
    "ddp_queue": (QUEUE, "ddp", 0, ["clip.logit_scale"]),
    "fsdp_moco_grad_cache": (MOCO, "fsdp", 4, ["clip.logit_scale"]),
    "ddp_global": (GLOBAL, "ddp", 0, ["clip.logit_scale"]),
    "ddp_global_grad_cache": (GLOBAL, "ddp", 4, ["clip.logit_scale"]),
    "ddp_hard_negatives": (HARD, "ddp", 0, ["clip.logit_scale"]),
    "fsdp_queue_hard_negatives_grad_cache": (HARD_QUEUE, "fsdp", 4, ["clip.logit_scale"]),
}


def run_case(rank: int, name: str, out_dir: str) -> None:
    cfg, parallel, chunk, _ = CASES[name]
    info = DistInfo(rank, WORLD, rank, torch.device("cpu"))
    model = fresh_model(cfg)
    # DDP's static graph where the trainer uses it: one backward per step
    wrapped = wrap_model(model, info, parallel=parallel, static_graph=chunk == 0)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    negatives = step_negatives(cfg, info)
    inputs = step_inputs(cfg, rows)
    if parallel == "ddp" and not chunk:  # the loss function on its own
        loss = contrastive_loss(wrapped, inputs, StepLoss(cfg, info, negatives))
        loss.backward()
    else:  # the trainer's step: GradCache chunks of 4 of the 6 samples (no_sync, then sync)
        fp32 = Precision("fp32", info.device)
        loss = forward_backward(
            wrapped, inputs, StepLoss(cfg, info, negatives), fp32, grad_cache_chunk=chunk
        )
    estimates = None  # the updated per-sample estimates, looked up from their owners ...
    if negatives is not None and negatives.denominators is not None:
        all_ids = step_negatives(cfg, ONE).ids
        estimates = negatives.denominators.lookup(all_ids)
        # ... and through a checkpoint's whole table (gathered to rank 0), re-sharded
        table = negatives.denominators.state_dict()
        table = [table] if rank == 0 else [None]
        dist.broadcast_object_list(table, src=0)
        reloaded = GlobalDenominators(20, info)
        reloaded.load_state_dict(table[0])
        assert torch.equal(reloaded.lookup(all_ids).nan_to_num(), estimates.nan_to_num())
    sync_replicated_grads(wrapped, info)
    norm = clip_grad_norm(model.parameters(), 0.0)
    # FSDP holds each gradient as this rank's shard (a DTensor): gather the whole one
    grads = {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone())
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    assert model_is_finite(model, info)
    result = {"loss": loss.detach(), "grads": grads, "norm": norm, "estimates": estimates}
    torch.save(result, f"{out_dir}/{name}-{rank}.pt")


def check_guard(rank: int, out_dir: str) -> None:
    """A non-finite loss on rank 0 only, then a non-finite gradient norm on rank 1 only."""
    guard = NonFiniteGuard(5, DistInfo(rank, WORLD, rank, torch.device("cpu")), scaled_fp16=False)
    one, bad = torch.tensor(1.0), torch.tensor(math.nan)
    verdicts = [
        guard.check(1, bad if rank == 0 else one, one)[1],
        guard.check(2, one, bad if rank == 1 else one)[1],
        guard.check(3, one, one)[1],
    ]
    torch.save({"verdicts": verdicts, "skipped": guard.skipped}, f"{out_dir}/guard-{rank}.pt")


def train_with(parallel: str, synth_dir: str, run_dir: Path, steps: int, resume: bool) -> None:
    """The trainer itself: GradCache steps with a feature queue, a checkpoint, the export (FSDP
    gathers for all three)."""
    cfg = apply_overrides(
        smoke(),
        [
            f"run_dir={run_dir}",
            f"steps={steps}",
            f"data.train_shards={synth_dir}/train/shard-{{000000..000007}}.tar",
            "data.val_shards=",
            "data.zeroshot_file=",
            "data.batch_size_per_rank=4",
            "optim.grad_cache_chunk=3",
            "logging.tensorboard=false",
            f"compute.parallel={parallel}",
            "loss.negatives=queue",  # a key encoder sharded like the model, and its queue
            "loss.queue_size=12",
            "loss.queue_momentum=0.5",
        ],
    )
    trainer = Trainer(cfg, resume=resume)
    try:
        trainer.train()
    finally:
        trainer.close(keep_process_group=True)  # for the next run


def worker(rank: int, port: int, out_dir: str, synth_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        for name in CASES:
            run_case(rank, name, out_dir)
        check_guard(rank, out_dir)
        for parallel in ("ddp", "fsdp"):
            train_with(parallel, synth_dir, Path(out_dir, parallel), steps=2, resume=False)
        train_with("fsdp", synth_dir, Path(out_dir, "fsdp"), steps=3, resume=True)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path):
    out = tmp_path_factory.mktemp("two_process")
    mp.spawn(worker, args=(free_port(), str(out), str(synth_dir)), nprocs=WORLD, join=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_apply_the_single_process_gradient(two_process_results, case: str):
    cfg, _, _, temperature_params = CASES[case]
    model = fresh_model(cfg)
    negatives = step_negatives(cfg, ONE)
    reference_loss = contrastive_loss(model, step_inputs(cfg), StepLoss(cfg, ONE, negatives))
    reference_loss.backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    results = [torch.load(two_process_results / f"{case}-{r}.pt") for r in range(WORLD)]
    # the ranks' losses average to the global loss ...
    assert_close(sum(r["loss"] for r in results) / WORLD, reference_loss.detach())
    # ... and after DDP's averaging (FSDP's reduce-scatter) each rank holds the global batch's
    # gradient, for every parameter including the temperature (and SigLIP's bias)
    assert set(temperature_params) <= reference.keys()
    assert reference.keys() == {n for n, _ in model.named_parameters()}
    for r in results:
        assert r["grads"].keys() == reference.keys()
        for name, grad in reference.items():
            # a float32 sum's rounding grows with its terms: the token embedding's end-of-text
            # row sums every caption's and negative's gradient (one element of it, 1.1e-3 in a
            # tensor whose largest is 5.6, came out 1.3e-6 apart with torch 2.14)
            atol = 1e-6 * max(1.0, grad.abs().max().item())
            assert_close(r["grads"][name], grad, rtol=1e-4, atol=atol, msg=name)
        assert_close(r["norm"], clip_grad_norm(model.parameters(), 0.0), rtol=1e-4, atol=0.0)
        if negatives is not None and negatives.denominators is not None:  # stored by owners
            expected = negatives.denominators.lookup(negatives.ids)
            assert_close(r["estimates"], expected, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.slow
def test_all_ranks_skip_a_step_that_is_non_finite_on_one(two_process_results):
    for rank in range(WORLD):
        result = torch.load(two_process_results / f"guard-{rank}.pt")
        assert result == {"verdicts": [False, False, True], "skipped": 2}


@pytest.mark.slow
def test_the_fsdp_trainer_trains_saves_exports_and_resumes_like_ddp(two_process_results):
    ddp = torch.load(two_process_results / "ddp/checkpoints/step-00000002.pt", weights_only=False)
    fsdp = torch.load(two_process_results / "fsdp/checkpoints/step-00000002.pt", weights_only=False)
    # the checkpoint holds whole tensors under the unsharded model's names, equal to DDP's
    assert fsdp["model"].keys() == ddp["model"].keys()
    for name, value in ddp["model"].items():
        assert_close(fsdp["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert "clip.text_projection" in fsdp["optimizer"]["state"]  # keyed by parameter name
    # the key encoder (an EMA of the model, sharded with it) and the queue it fills, as DDP's
    for name, value in ddp["negatives"]["momentum"].items():
        assert_close(fsdp["negatives"]["momentum"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        if name == "clip.text_projection":  # an EMA: between the initial and the new weights
            assert not torch.equal(value, ddp["model"][name])
    assert fsdp["negatives"]["queue"]["filled"] == 12  # full: 2 steps x 2 ranks x 4 keys > 12
    assert_close(fsdp["negatives"]["queue"]["texts"], ddp["negatives"]["queue"]["texts"])
    assert (two_process_results / "fsdp/artifact/open_clip_model.safetensors").is_file()
    resumed = torch.load(
        two_process_results / "fsdp/checkpoints/step-00000003.pt", weights_only=False
    )
    assert resumed["step"] == 3
    assert not torch.equal(
        resumed["model"]["clip.text_projection"], fsdp["model"]["clip.text_projection"]
    )


def test_siglip_model_starts_from_siglip_init():
    assert fresh_model(SIGLIP).clip.logit_bias.item() == -10.0  # t = log 10, b = -10
