"""The training loop: step, clip, schedule, checkpoint, evaluate, log, export."""

from __future__ import annotations

import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from common.config import to_dict
from common.hf_text import tokenizer_folder
from common.model import DualEncoder, build_model, local_dir, text_pooling
from common.preprocess import ResizeLimit, image_transform, preprocess_config, tokenizer
from common.shards import SKIP_REASONS
from train.checkpoint import Checkpointer, Restored, export_model, rng_state
from train.compute import Precision, prepare_model, uses_channels_last
from train.config import TrainConfig
from train.data import Batch, TrainBatches, check_eval_paths
from train.distributed import (
    DistInfo,
    close_distributed,
    full_model_state,
    init_distributed,
    is_sharded,
    shard_model,
    sync_replicated_grads,
    wrap_model,
)
from train.evaluate import evaluate
from train.metrics import MetricsLogger, StepWindow
from train.negatives import Negatives
from train.objective import Inputs, StepLoss
from train.optimizer import build_optimizer, warmup_cosine
from train.preemption import StopSignals
from train.rundir import claim_run_dir
from train.stability import NonFiniteGuard, clip_grad_norm
from train.step import forward_backward

log = logging.getLogger(__name__)


class Trainer:
    """Owns the model, optimizer, data stream and run directory of one (distributed) run."""

    def __init__(
        self, cfg: TrainConfig, *, resume: bool | Path = False, overwrite: bool = False
    ) -> None:
        """`resume`: True = the newest readable checkpoint in run_dir (none: start at step 0),
        a path = that checkpoint. `overwrite`: delete an earlier run's outputs in run_dir."""
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.device)
        self.run_dir = Path(cfg.run_dir)
        # from here on each rank's log also goes to RUN_DIR/logs/rank-R.log
        self.lock, self.log_file = claim_run_dir(
            self.run_dir, self.dist, resume=bool(resume), overwrite=overwrite
        )
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model: DualEncoder = build_model(
            cfg.model.name,
            pretrained=cfg.model.pretrained or None,
            device=self.dist.device,
            init_logit_scale=cfg.loss.init_logit_scale,
            init_logit_bias=cfg.loss.init_logit_bias,  # SigLIP's learned bias; None otherwise
            locks=cfg.model.locks,  # frozen parameters stay out of the optimizer (requires_grad)
        )
        self.model.train()
        self.text_pooling = text_pooling(self.model.clip)  # before FSDP changes its class
        self.precision = Precision(cfg.compute.precision, self.dist.device)
        # loss.negatives=queue's key encoder: a copy of the model as built, sharded like it
        sharded = self.dist.enabled and cfg.compute.parallel == "fsdp"
        self.negatives = Negatives(
            cfg.loss, self.model, self.dist, shard=shard_model if sharded else None
        )
        prepare_model(self.model, cfg.compute, self.dist.device)
        self.channels_last = uses_channels_last(self.model, cfg.compute, self.dist.device)
        # wrapped before the optimizer is built: FSDP replaces the parameters by their shards.
        # DDP's static graph breaks under no_sync, i.e. with several backward passes per step.
        one_backward = not cfg.optim.grad_cache_chunk and cfg.optim.accum_steps == 1
        self.ddp = wrap_model(
            self.model,
            self.dist,
            parallel=cfg.compute.parallel,
            static_graph=cfg.compute.ddp_static_graph and one_backward,
        )
        self.guard = NonFiniteGuard(
            cfg.optim.max_consecutive_nonfinite,
            self.dist,
            scaled_fp16=self.precision.scaler is not None,
        )
        self.grad_norm = torch.zeros(())
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.optim.warmup_steps, cfg.steps)
        )
        self.checkpointer = Checkpointer(
            cfg, self.dist, self.model, self.optimizer, self.scheduler, self.precision
        )
        self.ckpt_dir = self.checkpointer.ckpt_dir
        self.stop = StopSignals()
        self.stopped_by = 0  # the signal that ended the run early; 0 = it ran to the end
        restored: Restored | None = None
        if resume:
            restored = self.checkpointer.restore(None if resume is True else Path(resume))
        self.step = restored.step if restored else 0
        self.skipped = restored.skipped if restored else Counter[str]()
        # loss.hard_negatives: (real negatives, samples) of this rank's steps since the last record
        self.hard_negatives_used = torch.zeros(2, dtype=torch.int64, device=self.dist.device)
        preprocess = preprocess_config(self.model.clip)
        self.eval_transform = image_transform(preprocess, train=False)
        self.tokenize = tokenizer(cfg.model.name)  # cost-bounded (common.tokenize)
        # a Hugging Face tokenizer's files travel into the artifact (found now, not after training)
        self.tokenizer_folder = tokenizer_folder(self.model.config, local_dir(cfg.model.name))
        check_eval_paths(cfg.data)
        self.batches = TrainBatches(
            cfg.data,
            image_transform(preprocess, train=True, augment=cfg.data.augment.augmentation),
            self.tokenize,
            ResizeLimit(preprocess, cfg.data.max_resized_pixels),
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            start_epoch=restored.data_epoch if restored else 0,
            state=restored.data_state if restored else None,
            pin_memory=self.dist.device.type == "cuda",
            sample_ids=cfg.loss.negatives == "global",
            hard_negatives=cfg.data.hard_negatives if cfg.loss.hard_negatives else None,
            text_pooling=self.text_pooling,  # texts cut to their length: exact, and cheaper
        )
        self.negatives.set_num_samples(self.batches.num_samples)
        if restored:
            self.negatives.load_state_dict(restored.negatives, self.ddp)
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
        window = StepWindow()
        self.stop.install()
        while self.step < cfg.steps:
            waited = time.perf_counter()
            batch = next(data)  # the time spent here is the step's wait for input
            window.data_wait_s.append(time.perf_counter() - waited)
            loss = self.train_step(batch)
            self.step += 1
            self.skipped.update(batch.skipped)
            progress.update(1)
            progress.set_postfix(window.postfix(), refresh=False)
            if self.step % cfg.logging.every_steps == 0 or self.step == cfg.steps:
                window.stats = self._log_train(loss, window.summary(self.global_batch))
                window = StepWindow(stats=window.stats)
            # every rank stops at the same step, also if the signal reached only some of them
            self.stopped_by = self.stop.requested(self.dist.device, self.dist.enabled)
            if self.stopped_by:
                break
            if self.step % cfg.checkpoint.every_steps == 0 and self.step < cfg.steps:
                self.save()
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                self.run_eval()
        progress.close()
        self.save()
        if self.stopped_by:
            log.warning(
                "stopped by %s after step %d of %d: checkpoint saved; continue with --resume",
                signal.Signals(self.stopped_by).name,
                self.step,
                cfg.steps,
            )
            return {}
        self.export()
        return self.run_eval(final=True)

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns the global mean loss (detached).

        A step whose loss or gradients are non-finite on any rank is skipped on every rank: no
        optimizer or scheduler step, gradients dropped (train/stability.py).
        """
        cfg, device = self.cfg, self.dist.device
        images = batch.images.to(device, non_blocking=True)  # pinned on GPU: overlaps compute
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        tokens = batch.tokens.to(device, non_blocking=True)
        inputs = Inputs(images, tokens)
        if batch.negative_tokens is not None and batch.negative_mask is not None:
            mask = batch.negative_mask.to(device, non_blocking=True)
            inputs = Inputs(images, tokens, batch.negative_tokens.to(device), mask)
            self.hard_negatives_used[0] += mask.sum()  # on the device: no sync per step
            self.hard_negatives_used[1] += len(mask)
        self.optimizer.zero_grad(set_to_none=True)
        negatives = self.negatives.before_step(
            images, tokens, batch.ids, self.precision, cfg.optim.grad_cache_chunk
        )
        loss = forward_backward(
            self.ddp,
            inputs,
            StepLoss(cfg.loss, self.dist, negatives),
            self.precision,
            grad_cache_chunk=cfg.optim.grad_cache_chunk,
            accum_steps=cfg.optim.accum_steps,
        )
        sync_replicated_grads(self.ddp, self.dist)
        self.precision.unscale_(self.optimizer)
        self.grad_norm = clip_grad_norm(self.model.parameters(), cfg.optim.grad_clip_norm)
        global_loss, ok = self.guard.check(self.step + 1, loss, self.grad_norm)
        if not ok:
            if self.guard.skipped:  # not fp16's loss-scale skips
                self.checkpointer.keep_last_good(self.step + 1)
            self.precision.skip()
            self.optimizer.zero_grad(set_to_none=True)
            self.negatives.after_step(self.ddp, applied=False)
            return global_loss
        self.precision.step(self.optimizer)
        self.scheduler.step()
        self.model.clamp_logit_scale(cfg.loss.max_logit_scale)
        self.negatives.after_step(self.ddp, applied=True)
        return global_loss

    def _skipped_over_ranks(self) -> dict[str, int]:
        counts = torch.tensor([self.skipped[r] for r in SKIP_REASONS], dtype=torch.int64)
        if self.dist.enabled:
            counts = counts.to(self.dist.device)
            dist.all_reduce(counts)
        return dict(zip(SKIP_REASONS, counts.tolist(), strict=True))

    def _hard_negative_stats(self) -> dict[str, float]:
        """Real hard negatives the steps since the last record used, over all ranks: in all, and
        per sample (padding and samples without any make it less than data.hard_negatives'
        max_per_sample). Empty without loss.hard_negatives."""
        if not self.cfg.loss.hard_negatives:
            return {}
        used = self.hard_negatives_used.clone()
        if self.dist.enabled:
            dist.all_reduce(used)
        self.hard_negatives_used.zero_()
        negatives, samples = used.tolist()
        return {
            "hard_negatives": negatives,
            "hard_negatives_per_sample": negatives / max(1, samples),
        }

    def _log_train(self, loss: torch.Tensor, window: dict[str, float]) -> dict[str, Any]:
        skipped = self._skipped_over_ranks()
        samples_per_s = window.pop("samples_per_s")
        stats: dict[str, Any] = {
            "loss": loss.item(),
            "temperature": 1.0 / self.model.logit_scale.exp().item(),
            "logit_scale": self.model.logit_scale.exp().item(),
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": samples_per_s,
            # ranks step in lockstep (the gather), so each rank's share is an equal part
            "samples_per_s_per_rank": samples_per_s / self.dist.world_size,
            "world_size": self.dist.world_size,
            "global_batch": self.global_batch,
            "skipped_samples": sum(skipped.values()),
            "data_epoch": self.batches.epoch,
            "grad_norm": self.grad_norm.item(),
            "nonfinite_skipped": self.guard.skipped,  # steps skipped: non-finite loss/gradients
            **window,  # data_wait_s and friends: how long the steps waited for input
            **self.negatives.stats(),  # loss.negatives: keys queued, samples with an estimate
            **self._hard_negative_stats(),
        }
        if self.precision.scaler is not None:
            stats["loss_scale"] = self.precision.loss_scale
            stats["loss_scale_skipped"] = self.guard.loss_scale_skipped
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

    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks: RNG states, the data stream's position, skip counts."""
        return {
            "rng": rng_state(self.dist.device),
            "data": self.batches.state_dict(),
            "skipped": dict(self.skipped),
        }

    def save(self) -> None:
        """Checkpoint the run (every rank calls it; rank 0 writes)."""
        shared = {
            "negatives": self.negatives.state_dict(),  # a collective: every rank takes part
            "data_epoch": self.batches.epoch,
        }
        self.checkpointer.save(self.step, self.rank_state(), shared)

    def export(self) -> Path | None:
        """Rank 0 writes the inference artifact to RUN_DIR/artifact."""
        out = None
        model = self._whole_model()
        if self.dist.is_main:
            out = export_model(
                model,
                self.run_dir / "artifact",
                {"step": self.step, "config": to_dict(self.cfg)},
                self.tokenizer_folder,
            )
        self._barrier()
        return out

    def run_eval(self, *, final: bool = False) -> dict[str, float]:
        """Held-out recall@k and zero-shot accuracy on rank 0 (others wait); logged and saved.

        Rank 0 alone embeds the val shards: they are small next to training, and one process
        sees them in order. The others wait at the barrier, within the process group's timeout.
        """
        data, eval_cfg = self.cfg.data, self.cfg.eval
        if not final and self.step == self.cfg.steps:
            return {}  # the final evaluation follows at this same step
        results: dict[str, float] = {}
        # a sharded (FSDP) model runs its forward on every rank together: all ranks evaluate,
        # rank 0 logs
        if (self.dist.is_main or is_sharded(self.model)) and data.val_shards:
            start = time.perf_counter()
            results = evaluate(
                self.model,
                self.eval_transform,
                self.tokenize,
                data.val_shards,
                zeroshot_file=data.zeroshot_file,
                ks=eval_cfg.recall_at,
                batch_size=eval_cfg.batch_size,
                chunk_rows=eval_cfg.chunk_rows,
                max_resized_pixels=data.max_resized_pixels,
            )
            results["seconds"] = round(time.perf_counter() - start, 3)
            self.metrics.log_eval(self.step, results, final=final)
            log.info(
                "eval at step %d (%.1fs): %s",
                self.step,
                results["seconds"],
                {k: round(v, 4) for k, v in results.items()},
            )
            results["step"] = self.step
        self._barrier()
        return results

    def _whole_model(self) -> DualEncoder:
        """The model with whole weights: itself, or for FSDP a CPU copy on rank 0 (a collective;
        the other ranks get the sharded model back, unused)."""
        if not is_sharded(self.model):
            return self.model
        model_state = full_model_state(self.model)
        if not self.dist.is_main:
            return self.model
        whole = build_model(
            self.cfg.model.name,
            init_logit_scale=self.cfg.loss.init_logit_scale,
            init_logit_bias=self.cfg.loss.init_logit_bias,
            locks=self.cfg.model.locks,  # the same modules (a locked ResNet's frozen BatchNorm)
        )
        whole.load_state_dict(model_state)
        return whole

    def _barrier(self) -> None:
        if self.dist.enabled:
            dist.barrier()

    def close(self, *, keep_process_group: bool = False) -> None:
        """Release what the run holds: signal handlers, metrics files, the process group (unless
        kept, for another trainer in this process), the run_dir lock, the log file."""
        self.stop.restore()
        self.metrics.close()
        if not keep_process_group:
            close_distributed()
        if self.lock is not None:
            self.lock.release()
        logging.getLogger().removeHandler(self.log_file)
        self.log_file.close()
