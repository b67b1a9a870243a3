"""The training loop: step, clip, schedule, checkpoint, evaluate, log, export."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from common.config import to_dict
from common.hf_text import tokenizer_folder
from common.model import DualEncoder, build_model, local_dir
from common.preprocess import ResizeLimit, image_transform, preprocess_config, tokenizer
from common.shards import SKIP_REASONS
from train import checkpoint
from train.compute import Precision, prepare_model, uses_channels_last
from train.config import OptimConfig, TrainConfig
from train.data import Batch, TrainBatches, check_eval_paths
from train.distributed import (
    DistInfo,
    close_distributed,
    full_model_state,
    full_state_dicts,
    init_distributed,
    is_sharded,
    load_full_state_dicts,
    shard_model,
    sync_replicated_grads,
    wrap_model,
)
from train.evaluate import evaluate
from train.metrics import MetricsLogger
from train.negatives import Negatives
from train.preemption import StopSignals
from train.resume import (
    apply_optimizer_changes,
    check_changes,
    config_changes,
    needs_optimizer_changes,
)
from train.rundir import RunDirError, RunDirLock, acquire_lock, check_reuse, log_to_file
from train.stability import NonFiniteGuard, clip_grad_norm, model_is_finite
from train.step import forward_backward

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


@dataclass(slots=True)
class _Window:
    """Timings of the steps since the last metrics record, and that record's values."""

    start: float = field(default_factory=time.perf_counter)
    data_wait_s: list[float] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self, global_batch: int) -> dict[str, float]:
        """samples/s, and the wait for input per step: mean, max, share of the window's time."""
        elapsed = time.perf_counter() - self.start
        waited = sum(self.data_wait_s)
        return {
            "samples_per_s": len(self.data_wait_s) * global_batch / elapsed,
            "data_wait_s": waited / len(self.data_wait_s),
            "data_wait_max_s": max(self.data_wait_s),
            "data_wait_fraction": waited / elapsed,
        }

    def postfix(self) -> dict[str, str]:
        """The progress bar's: the last record's loss and samples/s, this step's input wait."""
        shown = {"data": f"{self.data_wait_s[-1]:.3f}s"}
        if self.stats:
            shown["loss"] = f"{self.stats['loss']:.3f}"
            shown["samples_per_s"] = f"{self.stats['samples_per_s']:.0f}"
        return shown


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
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.lock = self._claim_run_dir(resume=bool(resume), overwrite=overwrite)
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
        self.step, self.skipped = 0, Counter[str]()
        self.saved_step = -1  # the step whose state is on disk (restored or last saved)
        self.saved_path: Path | None = None  # and its file
        self.last_good_kept = False  # whether this run's first non-finite step came yet
        self.stop = StopSignals()
        self.stopped_by = 0  # the signal that ended the run early; 0 = it ran to the end
        self.data_state: dict[str, Any] | None = None  # this rank's stream position, restored
        self.data_epoch = 0  # where the stream starts without a restored position
        self.negatives_state: dict[str, Any] | None = None  # restored loss.negatives state
        if resume:
            self._restore(None if resume is True else Path(resume))
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
            start_epoch=self.data_epoch,
            state=self.data_state,
            pin_memory=self.dist.device.type == "cuda",
            sample_ids=cfg.loss.negatives == "global",
        )
        self.negatives.set_num_samples(self.batches.num_samples)
        if resume:
            self.negatives.load_state_dict(self.negatives_state, self.ddp)
        self.negatives_state = None
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
        window = _Window()
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
                window = _Window(stats=window.stats)
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
        self.optimizer.zero_grad(set_to_none=True)
        negatives = self.negatives.before_step(
            images, tokens, batch.ids, self.precision, cfg.optim.grad_cache_chunk
        )
        loss = forward_backward(
            self.ddp,
            images,
            tokens,
            self.dist,
            cfg.loss,
            self.precision,
            grad_cache_chunk=cfg.optim.grad_cache_chunk,
            accum_steps=cfg.optim.accum_steps,
            negatives=negatives,
        )
        sync_replicated_grads(self.ddp, self.dist)
        self.precision.unscale_(self.optimizer)
        self.grad_norm = clip_grad_norm(self.model.parameters(), cfg.optim.grad_clip_norm)
        global_loss, ok = self.guard.check(self.step + 1, loss, self.grad_norm)
        if not ok:
            self._keep_last_good()
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

    def _keep_last_good(self) -> None:
        """At the run's first non-finite step, protect the newest checkpoint from rotation: the
        ones written while the run goes on may hold weights already on their way to blowing up."""
        if self.last_good_kept or not self.guard.skipped:  # not fp16's loss-scale skips
            return
        self.last_good_kept = True
        if self.saved_path is None or not self.dist.is_main:
            return
        kept = checkpoint.keep_as_last_good(self.ckpt_dir, self.saved_path)
        log.warning(
            "step %d is non-finite: %s (step %d) kept as %s; to go back to it, resume with "
            "--resume %s (e.g. with a lower optim.lr)",
            self.step + 1,
            self.saved_path.name,
            self.saved_step,
            kept,
            kept,
        )

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
            "rng": checkpoint.rng_state(self.dist.device),
            "data": self.batches.state_dict(),
            "skipped": dict(self.skipped),
        }

    def state_dict(
        self, ranks: list[dict[str, Any]], negatives: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The whole resumable state; `ranks` holds every rank's `rank_state`, by rank, and
        `negatives` the loss.negatives state (`Negatives.state_dict`, a collective).

        With FSDP (compute.parallel=fsdp) a collective: every rank calls it, rank 0 gets it.
        """
        model_state, optimizer_state = full_state_dicts(self.model, self.optimizer)
        return {
            "negatives": negatives or {},
            "step": self.step,
            "data_epoch": self.batches.epoch,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "config": to_dict(self.cfg),
            "ranks": ranks,
            "scaler": self.precision.state_dict(),  # fp16's loss scale; empty otherwise
        }

    def save(self) -> None:
        """Rank 0 writes the checkpoint; the others wait so no rank runs ahead of a save."""
        if not model_is_finite(self.model, self.dist):  # every rank takes part, and agrees
            raise FloatingPointError(
                f"the model has non-finite parameters at step {self.step}: not checkpointing it"
            )
        ranks = self._gather_to_main(self.rank_state())
        negatives = self.negatives.state_dict()  # a collective: every rank takes part
        # FSDP gathers the whole weights to rank 0 in a collective: every rank takes part
        state = (
            self.state_dict(ranks, negatives) if self.dist.is_main or is_sharded(self.model) else {}
        )
        if self.dist.is_main and self.step != self.saved_step:  # e.g. resumed at the end
            self.saved_path = checkpoint.save_checkpoint(
                self.ckpt_dir, self.step, state, self.cfg.checkpoint.keep_last
            )
            log.info("saved checkpoint %s", self.saved_path)
        self.saved_step = self.step
        self._barrier()

    def _gather_to_main(self, obj: Any) -> list[Any]:
        """[rank 0's obj, rank 1's, ...] on rank 0 (other ranks get an empty list)."""
        if not self.dist.enabled:
            return [obj]
        out: list[Any] = [None] * self.dist.world_size if self.dist.is_main else []
        dist.gather_object(obj, out if self.dist.is_main else None, dst=0)
        return out

    def _restore(self, path: Path | None) -> None:
        """Load the checkpoint at `path` (None: the newest readable one, if any)."""
        if path is None:
            found = checkpoint.load_latest(self.ckpt_dir)
            if found is None:
                log.info("no checkpoint in %s: starting from step 0", self.ckpt_dir)
                return
            state, path = found
        else:
            state = checkpoint.load_checkpoint(path)
        changes = config_changes(state["config"], self.cfg)
        check_changes(changes, path)  # refuses what the restored state would undo
        load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if needs_optimizer_changes(changes):
            apply_optimizer_changes(self.optimizer, self.scheduler, state["config"], self.cfg)
        self.precision.load_state_dict(state.get("scaler") or {})
        self.negatives_state = state.get("negatives")  # loaded once the data's size is known
        self.step = self.saved_step = int(state["step"])
        self.saved_path = path
        self._barrier()  # every rank has read the checkpoints before any is moved
        if self.dist.is_main:
            for moved in checkpoint.set_aside_newer(self.ckpt_dir, self.step):
                log.warning("newer than the resumed checkpoint: moved to %s", moved)
        ranks = state.get("ranks") or []
        if len(ranks) == self.dist.world_size:
            mine = ranks[self.dist.rank]
            checkpoint.set_rng_state(mine["rng"], self.dist.device)
            self.data_state = mine["data"]  # the stream resumes exactly where it stopped
            self.skipped = Counter(mine["skipped"])
        else:
            # Saved by another number of ranks: positions and RNG streams do not map onto
            # these ranks, so the data restarts at the next epoch and rank 0 keeps the counts.
            log.warning(
                "%s was saved by %d ranks, this run has %d: the data stream restarts at epoch "
                "%d and the RNGs are not restored",
                path,
                len(ranks),
                self.dist.world_size,
                int(state["data_epoch"]) + 1,
            )
            self.data_epoch = int(state["data_epoch"]) + 1
            if self.dist.is_main:
                self.skipped = sum((Counter(r["skipped"]) for r in ranks), Counter[str]())
        log.info("resumed from %s at step %d", path, self.step)

    def export(self) -> Path | None:
        """Rank 0 writes the inference artifact to RUN_DIR/artifact."""
        out = None
        model = self._whole_model()
        if self.dist.is_main:
            out = checkpoint.export_model(
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

    def _claim_run_dir(self, *, resume: bool, overwrite: bool) -> RunDirLock | None:
        """Rank 0 locks run_dir and checks this run may use it; every rank learns the verdict.

        From here on each rank's log also goes to RUN_DIR/logs/rank-R.log.
        """
        lock, error = None, ""
        if self.dist.is_main:
            try:
                lock = acquire_lock(self.run_dir)
                check_reuse(self.run_dir, resume=resume, overwrite=overwrite)
            except RunDirError as exc:
                error = str(exc)
        if self.dist.enabled:
            verdict = [error]
            dist.broadcast_object_list(verdict, src=0)
            error = verdict[0]
        if error:
            if lock is not None:
                lock.release()
            raise RunDirError(error)
        self.log_file = log_to_file(self.run_dir, self.dist.rank)
        return lock

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
