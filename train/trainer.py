"""The training loop: step, clip, schedule, checkpoint, evaluate, log, export."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from common.config import from_dict, to_dict
from common.model import DualEncoder, build_model
from common.preprocess import image_transform, preprocess_config, tokenizer
from common.shards import SKIP_REASONS
from train import checkpoint
from train.config import OptimConfig, TrainConfig
from train.data import Batch, TrainBatches
from train.distributed import (
    DistInfo,
    close_distributed,
    contrastive_loss,
    init_distributed,
    mean_over_ranks,
    wrap_model,
)
from train.evaluate import evaluate
from train.metrics import MetricsLogger

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; biases, norm parameters and the temperature (all < 2-D) get no weight decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or name.endswith("bias") or "logit_" in name
        (no_decay if exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel is one pass over all parameters (CPU and CUDA): ~15x faster than
    # the per-tensor loop for the small models trained on CPU here.
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True
    )


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor after `step` optimizer steps: linear warmup to 1, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """Owns the model, optimizer, data stream and run directory of one (distributed) run."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.device)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model: DualEncoder = build_model(
            cfg.model.name,
            pretrained=cfg.model.pretrained or None,
            device=self.dist.device,
            init_logit_scale=cfg.loss.init_logit_scale,
            init_logit_bias=cfg.loss.init_logit_bias,  # SigLIP's learned bias; None otherwise
        )
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.optim.warmup_steps, cfg.steps)
        )
        self.step, self.data_epoch, self.skipped = 0, 0, Counter[str]()
        if resume:
            self._restore()
        self.ddp = wrap_model(self.model, self.dist)
        preprocess = preprocess_config(self.model.clip)
        self.eval_transform = image_transform(preprocess, train=False)
        self.tokenize = tokenizer(cfg.model.name)
        self.batches = TrainBatches(
            cfg.data,
            image_transform(preprocess, train=True),
            self.tokenize,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            start_epoch=self.data_epoch,
        )
        self.metrics = MetricsLogger(
            self.run_dir, enabled=self.dist.is_main, tensorboard=cfg.logging.tensorboard
        )
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size_per_rank * self.dist.world_size

    def train(self) -> dict[str, float]:
        """Train to cfg.steps (from the restored step), save, export, evaluate; return eval."""
        cfg = self.cfg
        log.info(
            "world size %d, global batch %d (%d per rank), steps %d -> %d, device %s",
            self.dist.world_size,
            self.global_batch,
            cfg.data.batch_size_per_rank,
            self.step,
            cfg.steps,
            self.dist.device,
        )
        if self.step >= cfg.steps:
            log.info("the run is already at step %d of %d: nothing to train", self.step, cfg.steps)
        data: Iterator[Batch] = iter(self.batches)
        progress = tqdm(
            total=cfg.steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.dist.is_main and cfg.logging.progress),
        )
        window_start, window_steps = time.perf_counter(), 0
        while self.step < cfg.steps:
            batch = next(data)
            loss = self.train_step(batch)
            self.step += 1
            window_steps += 1
            self.skipped.update(batch.skipped)
            progress.update(1)
            if self.step % cfg.logging.every_steps == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                stats = self._log_train(loss, window_steps * self.global_batch / elapsed)
                progress.set_postfix(
                    loss=f"{stats['loss']:.3f}", samples_per_s=f"{stats['samples_per_s']:.0f}"
                )
                window_start, window_steps = time.perf_counter(), 0
            if self.step % cfg.checkpoint.every_steps == 0 and self.step < cfg.steps:
                self.save()
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                self.run_eval()
        progress.close()
        self.save()
        self.export()
        return self.run_eval(final=True)

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns the global mean loss (detached)."""
        device = self.dist.device
        loss = contrastive_loss(
            self.ddp, batch.images.to(device), batch.tokens.to(device), self.dist, self.cfg.loss
        )
        global_loss = mean_over_ranks(loss.detach(), self.dist)
        if not torch.isfinite(global_loss):
            # every rank sees the same global value, so all stop together instead of hanging
            raise FloatingPointError(
                f"non-finite loss {global_loss.item()} at step {self.step + 1}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.model.clamp_logit_scale(self.cfg.loss.max_logit_scale)
        return global_loss

    def _skipped_over_ranks(self) -> dict[str, int]:
        counts = torch.tensor([self.skipped[r] for r in SKIP_REASONS], dtype=torch.int64)
        if self.dist.enabled:
            counts = counts.to(self.dist.device)
            dist.all_reduce(counts)
        return dict(zip(SKIP_REASONS, counts.tolist(), strict=True))

    def _log_train(self, loss: torch.Tensor, samples_per_s: float) -> dict[str, Any]:
        skipped = self._skipped_over_ranks()
        stats: dict[str, Any] = {
            "loss": loss.item(),
            "temperature": 1.0 / self.model.logit_scale.exp().item(),
            "logit_scale": self.model.logit_scale.exp().item(),
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": samples_per_s,
            "samples_per_s_per_rank": samples_per_s / self.dist.world_size,
            "skipped_samples": sum(skipped.values()),
            "data_epoch": self.batches.epoch,
        }
        stats.update({f"skipped/{reason}": n for reason, n in skipped.items() if n})
        if stats["skipped_samples"]:
            log.info(
                "step %d: %d samples skipped so far %s",
                self.step,
                stats["skipped_samples"],
                {k: v for k, v in skipped.items() if v},
            )
        self.metrics.log(self.step, stats)
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data_epoch": self.batches.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "skipped": dict(self.skipped),
            "config": to_dict(self.cfg),
            "torch_rng": torch.get_rng_state(),
        }

    def save(self) -> None:
        """Rank 0 writes the checkpoint; the others wait so no rank runs ahead of a save."""
        done = checkpoint.checkpoint_path(self.ckpt_dir, self.step).exists()  # e.g. resumed at end
        if self.dist.is_main and not done:
            path = checkpoint.save_checkpoint(
                self.ckpt_dir, self.step, self.state_dict(), self.cfg.checkpoint.keep_last
            )
            log.info("saved checkpoint %s", path)
        self._barrier()

    def _restore(self) -> None:
        found = checkpoint.load_latest(self.ckpt_dir)
        if found is None:
            log.info("no checkpoint in %s: starting from step 0", self.ckpt_dir)
            return
        state, path = found
        saved = from_dict(TrainConfig, state["config"])
        if saved.model.name != self.cfg.model.name:
            raise ValueError(
                f"{path} is a {saved.model.name} checkpoint, the config says {self.cfg.model.name}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        # The data stream restarts at the next epoch's shuffle: samples of the interrupted
        # epoch that were not reached yet are not replayed.
        self.data_epoch = int(state["data_epoch"]) + 1
        self.skipped = Counter(state.get("skipped", {}))
        log.info("resumed from %s at step %d", path, self.step)

    def export(self) -> Path | None:
        """Rank 0 writes the inference artifact to RUN_DIR/artifact."""
        out = None
        if self.dist.is_main:
            out = checkpoint.export_model(
                self.model,
                self.run_dir / "artifact",
                {"step": self.step, "config": to_dict(self.cfg)},
            )
        self._barrier()
        return out

    def run_eval(self, *, final: bool = False) -> dict[str, float]:
        """Held-out recall@k and zero-shot accuracy on rank 0 (others wait); logged and saved."""
        data = self.cfg.data
        results: dict[str, float] = {}
        if self.dist.is_main and data.val_shards:
            start = time.perf_counter()
            results = evaluate(
                self.model,
                self.eval_transform,
                self.tokenize,
                data.val_shards,
                zeroshot_file=data.zeroshot_file,
                ks=self.cfg.eval.recall_at,
                batch_size=self.cfg.eval.batch_size,
            )
            results["step"] = self.step
            self.metrics.log(self.step, results, prefix="eval")
            log.info(
                "eval at step %d (%.1fs): %s",
                self.step,
                time.perf_counter() - start,
                {k: round(v, 4) for k, v in results.items()},
            )
            if final:
                (self.run_dir / "eval.json").write_text(json.dumps(results, indent=2))
        self._barrier()
        return results

    def _barrier(self) -> None:
        if self.dist.enabled:
            dist.barrier()

    def close(self) -> None:
        self.metrics.close()
        close_distributed()
