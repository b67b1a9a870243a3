"""The training config tree (data, model, loss, optim, checkpoint, eval, logging) and its recipes.

Each node validates itself in `__post_init__` and names the bad field. Recipes are functions that
return a whole config; `--set a.b=v` changes any field afterwards (see common/config.py).
Arithmetic to keep in mind: samples per step (global batch) = batch_size_per_rank x world_size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from common.model import TowerLocks
from common.preprocess import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_RESIZED_PIXELS, Augmentation


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _require_finite(value: float, name: str) -> None:
    """A float field must be a number: inf and nan pass every `>` test they should fail."""
    _require(math.isfinite(value), name, f"must be a finite number, got {value}")


ERASE_MODES = ("const", "rand", "pixel")


@dataclass(kw_only=True, slots=True)
class AugmentConfig:
    """Training image augmentation, in this order: crop, colour jitter, grey, blur, to tensor,
    normalise, erase (evaluation and serving never augment). The defaults crop 90-100% of the
    image and do nothing else; SimCLR's recipe is crop_scale_min=0.08, color_jitter_prob=0.8
    (strengths (0.8, 0.8, 0.8, 0.2) at its strength 1), gray_scale_prob=0.2, blur_prob=0.5."""

    crop_scale_min: float = 0.9
    """Random resized crop: the smallest fraction of the image's area a crop covers."""
    crop_scale_max: float = 1.0
    """Random resized crop: the largest fraction of the image's area a crop covers."""
    crop_ratio_min: float = 3 / 4
    """Random resized crop: the smallest aspect ratio (width / height) of the cropped region,
    before it is resized to the model's input size."""
    crop_ratio_max: float = 4 / 3
    """Random resized crop: the largest aspect ratio (width / height) of the cropped region."""
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    """Colour jitter strengths (brightness, contrast, saturation, hue): factors drawn from
    [1 - s, 1 + s] and a hue shift from [-h, h], h <= 0.5. The default is SimCLR's strength 0.5."""
    color_jitter_prob: float = 0.0
    """Chance that an image is colour-jittered (0 = off)."""
    gray_scale_prob: float = 0.0
    """Chance that an image is turned grey (its three channels equal; 0 = off)."""
    blur_prob: float = 0.0
    """Chance of SimCLR's Gaussian blur, with a kernel 10% of the image side (0 = off)."""
    blur_sigma_min: float = 0.1
    """The blur's sigma (in pixels of the model's input) is drawn from [min, max]."""
    blur_sigma_max: float = 2.0
    """The largest sigma of the blur."""
    re_prob: float = 0.0
    """Chance that an image gets random erasing (timm's RandomErasing; 0 = off): boxes of 2-33%
    of the image with aspect ratios 0.3-3.3."""
    re_mode: str = "pixel"
    """What an erased box holds, in normalised units: const: zeros (the mean colour); rand: one
    random normal colour per box; pixel: per-pixel normal noise."""
    re_count: int = 1
    """Boxes per erased image: drawn from 1..re_count, each with 1/count of one box's area."""

    def __post_init__(self) -> None:
        for kind in ("crop_scale", "crop_ratio", "blur_sigma"):  # (min, max) ranges
            low, high = getattr(self, f"{kind}_min"), getattr(self, f"{kind}_max")
            _require_finite(low, f"data.augment.{kind}_min")
            _require_finite(high, f"data.augment.{kind}_max")
            _require(low <= high, f"data.augment.{kind}_min", f"must be <= {kind}_max ({high})")
        for name in ("crop_scale_min", "crop_scale_max"):
            _require(0 < getattr(self, name) <= 1, f"data.augment.{name}", "must be in (0, 1]")
        for name in ("crop_ratio_min", "blur_sigma_min"):
            _require(getattr(self, name) > 0, f"data.augment.{name}", "must be > 0")
        for name in ("color_jitter_prob", "gray_scale_prob", "blur_prob", "re_prob"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"data.augment.{name}", f"must be in [0, 1], got {value}")
        self._check_jitter()
        _require(
            self.re_mode in ERASE_MODES,
            "data.augment.re_mode",
            f"must be one of {', '.join(ERASE_MODES)}",
        )
        _require(self.re_count >= 1, "data.augment.re_count", "must be >= 1")

    def _check_jitter(self) -> None:
        name = "data.augment.color_jitter"
        _require(
            len(self.color_jitter) == 4,
            name,
            f"must be 4 numbers (brightness, contrast, saturation, hue), got {self.color_jitter}",
        )
        _require(
            all(math.isfinite(s) and s >= 0 for s in self.color_jitter),
            name,
            "every strength must be a finite number >= 0",
        )
        _require(self.color_jitter[3] <= 0.5, name, "the hue strength must be <= 0.5")

    @property
    def augmentation(self) -> Augmentation:
        """These settings as `common.preprocess.image_transform` takes them."""
        return Augmentation(
            crop_scale=(self.crop_scale_min, self.crop_scale_max),
            crop_ratio=(self.crop_ratio_min, self.crop_ratio_max),
            color_jitter=self.color_jitter,
            color_jitter_prob=self.color_jitter_prob,
            gray_scale_prob=self.gray_scale_prob,
            blur_prob=self.blur_prob,
            blur_sigma=(self.blur_sigma_min, self.blur_sigma_max),
            re_prob=self.re_prob,
            re_mode=self.re_mode,
            re_count=self.re_count,
        )


HARD_NEGATIVE_SOURCES = ("off", "missing", "always")
GENERATED_KINDS = ("swap_attribute", "swap_object", "replace_relation")


@dataclass(kw_only=True, slots=True)
class HardNegativesConfig:
    """Where a training sample's hard-negative captions come from (with loss.hard_negatives):
    the "hard_negatives" of its KEY.json (a list, or kind -> caption), and the built-in
    generator of train/hard_negatives.py. Each sample takes at most max_per_sample."""

    generate: str = "off"
    """off: the shard's negatives only; missing: generated for samples whose JSON has none;
    always: generated for every sample, the shard's ignored."""
    kinds: tuple[str, ...] = GENERATED_KINDS
    """The generator's kinds: swap_attribute, swap_object, replace_relation."""
    max_per_sample: int = 3
    """K: negatives per sample (more are sampled down to K, fewer padded and masked). Each
    sample's text forward costs 1 + K captions."""
    max_chars: int = 300
    """Longer negatives (and captions, for the generator) are left out: a shard's JSON may hold
    anything, and tokenizing it is work before the tokenizer's own bound."""

    def __post_init__(self) -> None:
        _require(
            self.generate in HARD_NEGATIVE_SOURCES,
            "data.hard_negatives.generate",
            f"must be one of {', '.join(HARD_NEGATIVE_SOURCES)}",
        )
        _require(
            bool(self.kinds) and all(kind in GENERATED_KINDS for kind in self.kinds),
            "data.hard_negatives.kinds",
            f"must be some of {', '.join(GENERATED_KINDS)}",
        )
        _require(
            1 <= self.max_per_sample <= 16, "data.hard_negatives.max_per_sample", "must be 1..16"
        )
        _require(self.max_chars >= 1, "data.hard_negatives.max_chars", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    train_shards: str = "data/synth/train/shard-{000000..000015}.tar"
    """Training shards: paths or webdataset URLs (`pipe:CMD` reads CMD's stdout) with brace
    ranges; several sources joined by '::'."""
    train_weights: tuple[float, ...] = ()
    """One sampling weight per '::' source of train_shards: samples are interleaved in these
    proportions. Empty: the sources are one shard list, each shard read once per epoch."""
    resampled: bool = False
    """Draw shards with replacement, endlessly (an epoch is then samples_per_epoch samples);
    False: every shard is read once per epoch, in a new order each epoch."""
    samples_per_epoch: int = 0
    """Samples in one epoch; 0 = count them from sizes.json, img2dataset's *_stats.json or a
    scan of the local tars. Needed with resampled=True for remote shards."""
    shard_retries: int = 2
    """Retries of a shard that cannot be opened or read (e.g. its pipe command fails) before it
    is skipped with a warning and counted as skipped/failed_shard."""
    val_shards: str = "data/synth/val/shard-{000000..000001}.tar"
    """Held-out shards for evaluation ('' to skip retrieval evaluation)."""
    zeroshot_file: str = "data/synth/zeroshot.json"
    """JSON with "classnames" and "templates" for zero-shot accuracy ('' to skip)."""
    batch_size_per_rank: int = 64
    """Samples per step on each rank; the global batch is this x world size."""
    workers: int = 1
    """DataLoader worker processes per rank (0 = load in the training process)."""
    worker_niceness: int = 10
    """Added to each data worker's Unix niceness (0-19; 0 = the training process's priority).
    When the CPU is short, the training step runs first and workers take the idle cycles; on 2
    cores this halves the first step, which otherwise competes with workers filling their queue."""
    shuffle_buffer: int = 1000
    """Samples held in the in-stream shuffle buffer of each worker."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images whose header announces more pixels are skipped without being decoded."""
    max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS
    """Images that the model's resize would make larger than this (thin ones: a 40,000,000 x 1
    image is 32 x 1.3 G pixels resized) are skipped without being decoded, as the service
    refuses them."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training image augmentation (`--set data.augment.blur_prob=0.5`)."""
    hard_negatives: HardNegativesConfig = field(default_factory=HardNegativesConfig)
    """Hard-negative captions per sample, used with loss.hard_negatives=true."""

    def __post_init__(self) -> None:
        _require(bool(self.train_shards.strip()), "data.train_shards", "must name shards")
        _require(self.batch_size_per_rank >= 1, "data.batch_size_per_rank", "must be >= 1")
        _require(self.workers >= 0, "data.workers", "must be >= 0")
        _require(0 <= self.worker_niceness <= 19, "data.worker_niceness", "must be in 0..19")
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        _require(self.max_image_pixels > 0, "data.max_image_pixels", "must be > 0")
        _require(self.max_resized_pixels > 0, "data.max_resized_pixels", "must be > 0")
        sources = [part for part in self.train_shards.split("::") if part.strip()]
        _require(
            not self.train_weights or len(self.train_weights) == len(sources),
            "data.train_weights",
            f"has {len(self.train_weights)} weights for {len(sources)} '::' sources",
        )
        _require(
            all(math.isfinite(w) and w > 0 for w in self.train_weights),
            "data.train_weights",
            "every weight must be a finite number > 0",
        )
        _require(self.samples_per_epoch >= 0, "data.samples_per_epoch", "must be >= 0")
        _require(self.shard_retries >= 0, "data.shard_retries", "must be >= 0")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name: str = "duet-tiny"
    """open_clip architecture name, or a bundled tiny config (duet-tiny, duet-micro)."""
    pretrained: str = ""
    """Local weights to start from ('' = random init): a state dict, .safetensors, an
    open_clip_train or duet checkpoint, or an artifact / hub-layout folder. Loaded strictly, and
    what was loaded is logged. Nothing is downloaded."""
    lock_image: bool = False
    """Freeze the image tower (LiT); frozen parameters are not in the optimizer or DDP's sync."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: the last N layer groups of the image tower stay trainable."""
    lock_image_freeze_bn_stats: bool = False
    """With lock_image: BatchNorm running statistics are frozen too (ResNet towers)."""
    lock_text: bool = False
    """Freeze the text tower."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: the last N layer groups of the text tower stay trainable."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", "must be set")
        for field_name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            _require(getattr(self, field_name) >= 0, f"model.{field_name}", "must be >= 0")
        _require(
            not (self.lock_image and self.lock_text)
            or self.lock_image_unlocked_groups + self.lock_text_unlocked_layers > 0,
            "model.lock_text",
            "with model.lock_image too, nothing but the temperature would train",
        )

    @property
    def locks(self) -> TowerLocks:
        """The tower locks as `common.model.build_model` takes them."""
        return TowerLocks(
            image=self.lock_image,
            image_unlocked_groups=self.lock_image_unlocked_groups,
            image_freeze_bn_stats=self.lock_image_freeze_bn_stats,
            text=self.lock_text,
            text_unlocked_layers=self.lock_text_unlocked_layers,
        )


LOSS_KINDS = ("clip", "nt_xent", "siglip", "debiased", "hard_negative", "multi_positive", "hinge")
LOSS_IMPLEMENTATIONS = ("tiled", "plain")
HINGE_REDUCTIONS = ("max", "sum")
NEGATIVES = ("batch", "queue", "global")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    kind: str = "clip"
    """clip: symmetric InfoNCE (CLIP); nt_xent: SimCLR's NT-Xent over the 2N embeddings;
    siglip: pairwise sigmoid (SigLIP); debiased: Chuang et al. 2020; hard_negative: Robinson et
    al. 2021; multi_positive: SupCon-style, samples with identical captions are positives;
    hinge: VSE++'s triplet loss on cosines over each pair's hardest negatives, or all of them
    (hinge_reduction; Faghri et al. 2018); the logit scale is unused (it gets a zero gradient)."""
    implementation: str = "tiled"
    """tiled: blockwise, O(N x D) memory, exact (bench/loss.py: as fast as plain or faster);
    plain: materialises the [n, N] logit matrix (the reference)."""
    block_size: int = 2048
    """Rows (and columns) per block of the tiled loss: four block_size^2 buffers live at once."""
    init_temperature: float = 0.07
    """Initial temperature; the learned logit scale starts at log(1/init_temperature)."""
    max_logit_scale: float = 100.0
    """exp(logit_scale) is clamped to this after each step, as in CLIP."""
    siglip_init_temperature: float = 0.1
    """SigLIP's initial temperature (kind=siglip): logit scale log(10), as in Zhai et al. 2023."""
    siglip_init_logit_bias: float = -10.0
    """SigLIP's initial learned logit bias (kind=siglip); the other kinds have no bias."""
    debiased_tau_plus: float = 0.1
    """Class prior tau+ of debiased and hard_negative: the chance that a negative is a positive."""
    hard_negative_beta: float = 1.0
    """Concentration beta of hard_negative: negatives are reweighted by exp(beta * logit)."""
    hinge_margin: float = 0.2
    """Margin of hinge: a negative costs [margin - cos(positive) + cos(negative)]_+ (VSE++: 0.2).
    Cosines differ by at most 2: from a margin of 2 on, every hinge would always be active."""
    hinge_reduction: str = "max"
    """How hinge reduces each anchor's hinge terms over its negatives. max: the hardest one
    (VSE++'s max of hinges, MH); sum: all of them (VSE0, the classic triplet loss)."""
    negatives: str = "batch"
    """Where kind=clip's negatives come from. batch: the global batch (CLIP); queue: also a
    queue of the last queue_size keys of a momentum encoder (MoCo, He et al. 2020); global: a
    per-sample moving estimate of each anchor's denominator over the whole dataset (SogCLR,
    Yuan et al. 2022; FastCLIP, Wei et al. 2024). docs/architecture.md has the formulas."""
    queue_size: int = 4096
    """negatives=queue: image keys and text keys kept as extra negatives (from all ranks)."""
    queue_momentum: float = 0.995
    """negatives=queue: the key encoder follows the model as an EMA with this momentum after
    each step; 0 = no key encoder: the queue holds the model's own (detached) features."""
    queue_batch_keys: str = "online"
    """negatives=queue: the batch's own candidates (its pairs and in-batch negatives). online:
    the model's features, with gradient, as in CLIP (the queue only adds columns); momentum: the
    key encoder's, as in MoCo (gradient through the anchors only)."""
    global_gamma: float = 0.9
    """negatives=global: u <- (1 - gamma) u + gamma g, the moving-average rate of each sample's
    denominator estimate u (g: the batch's estimate); 1 = no memory (CLIP with fixed weights)."""
    global_temperature: str = "learned"
    """negatives=global: learned: one global temperature learned with FastCLIP-v3's objective
    (tau * log u + rho * tau); fixed: the temperature stays at init_temperature (SogCLR)."""
    global_rho: float = 6.5
    """negatives=global, learned temperature: rho of FastCLIP-v3's objective (its tau term)."""
    global_eps: float = 1e-14
    """negatives=global: epsilon in log(eps + u), as in FastCLIP."""
    hard_negatives: bool = False
    """NegCLIP (Yuksekgonul et al. 2023): each sample's hard-negative captions (from its shard
    or generated: data.hard_negatives) are encoded by the text tower and become extra columns of
    the image->text direction for every image of the global batch. kind=clip only; combines with
    any loss.negatives, GradCache, accumulation, DDP and FSDP."""

    def __post_init__(self) -> None:
        _require(self.kind in LOSS_KINDS, "loss.kind", f"must be one of {', '.join(LOSS_KINDS)}")
        _require(
            self.implementation in LOSS_IMPLEMENTATIONS,
            "loss.implementation",
            f"must be one of {', '.join(LOSS_IMPLEMENTATIONS)}",
        )
        _require(self.block_size >= 1, "loss.block_size", "must be >= 1")
        _require_finite(self.max_logit_scale, "loss.max_logit_scale")
        _require(self.max_logit_scale >= 1, "loss.max_logit_scale", "must be >= 1")
        for name in ("init_temperature", "siglip_init_temperature"):
            _require(
                1 / self.max_logit_scale <= getattr(self, name) <= 1,
                f"loss.{name}",
                "must be in [1/max_logit_scale, 1]",
            )
        _require(
            math.isfinite(self.siglip_init_logit_bias),
            "loss.siglip_init_logit_bias",
            "must be finite",
        )
        _require(0 <= self.debiased_tau_plus < 1, "loss.debiased_tau_plus", "must be in [0, 1)")
        # beta = 0 is the debiased loss; > 0 keeps every logit multiplier of the tiled LSE positive
        _require(
            0 < self.hard_negative_beta < 100, "loss.hard_negative_beta", "must be in (0, 100)"
        )
        _require_finite(self.hinge_margin, "loss.hinge_margin")
        _require(0 <= self.hinge_margin <= 2, "loss.hinge_margin", "must be in [0, 2]")
        _require(
            self.hinge_reduction in HINGE_REDUCTIONS,
            "loss.hinge_reduction",
            f"must be one of {', '.join(HINGE_REDUCTIONS)}",
        )
        self._check_negatives()

    def _check_negatives(self) -> None:
        _require(
            self.negatives in NEGATIVES, "loss.negatives", f"must be one of {', '.join(NEGATIVES)}"
        )
        _require(
            self.negatives == "batch" or self.kind == "clip",
            "loss.negatives",
            f"{self.negatives} works with loss.kind=clip only, not {self.kind}",
        )
        _require(self.queue_size >= 1, "loss.queue_size", "must be >= 1")
        for name in ("queue_momentum", "global_gamma", "global_rho", "global_eps"):
            _require_finite(getattr(self, name), f"loss.{name}")
        _require(0 <= self.queue_momentum < 1, "loss.queue_momentum", "must be in [0, 1)")
        _require(
            self.queue_batch_keys in ("online", "momentum"),
            "loss.queue_batch_keys",
            "must be online or momentum",
        )
        _require(
            not (self.queue_batch_keys == "momentum" and self.queue_momentum == 0),
            "loss.queue_batch_keys",
            "momentum needs a key encoder: loss.queue_momentum > 0",
        )
        _require(0 < self.global_gamma <= 1, "loss.global_gamma", "must be in (0, 1]")
        _require(
            self.global_temperature in ("learned", "fixed"),
            "loss.global_temperature",
            "must be learned or fixed",
        )
        _require(self.global_rho >= 0, "loss.global_rho", "must be >= 0")
        _require(self.global_eps > 0, "loss.global_eps", "must be > 0")
        _require(
            not self.hard_negatives or self.kind == "clip",
            "loss.hard_negatives",
            f"works with loss.kind=clip only, not {self.kind}",
        )

    @property
    def init_logit_scale(self) -> float:
        """log(1/temperature) the model starts from: SigLIP's own for kind=siglip."""
        temperature = (
            self.siglip_init_temperature if self.kind == "siglip" else self.init_temperature
        )
        return math.log(1 / temperature)

    @property
    def init_logit_bias(self) -> float | None:
        """The learned bias's initial value for kind=siglip; None (no bias) for the others."""
        return self.siglip_init_logit_bias if self.kind == "siglip" else None


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate, reached after warmup_steps."""
    weight_decay: float = 0.1
    """AdamW decay for weight matrices; biases, norm parameters and the temperature get none."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    """Linear warmup from 0 to lr; then cosine decay to 0 at the last step."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    grad_cache_chunk: int = 0
    """GradCache (0 = off): embed the per-rank batch in chunks of this many samples without a
    graph, take the exact loss over the whole global batch, then re-run each chunk with its graph
    and back-propagate the cached feature gradients. Same loss and gradient as one pass over the
    batch, with the activation memory of one chunk, for about 1.3x the compute."""
    accum_steps: int = 1
    """Plain gradient accumulation: split the per-rank batch into this many micro-batches, each a
    separate loss whose negatives are only that micro-batch's (across ranks). That CHANGES a
    contrastive loss (fewer negatives); grad_cache_chunk keeps it exact."""
    max_consecutive_nonfinite: int = 10
    """Steps with a non-finite loss or gradient are skipped and counted; this many in a row stop
    the run with an error naming the steps."""

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip_norm"):
            _require_finite(getattr(self, name), f"optim.{name}")
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        _require(self.eps > 0, "optim.eps", "must be > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(self.grad_clip_norm >= 0, "optim.grad_clip_norm", "must be >= 0")
        _require(self.grad_cache_chunk >= 0, "optim.grad_cache_chunk", "must be >= 0 (0 = off)")
        _require(self.accum_steps >= 1, "optim.accum_steps", "must be >= 1 (1 = off)")
        _require(
            not (self.grad_cache_chunk and self.accum_steps > 1),
            "optim.grad_cache_chunk",
            "cannot be combined with optim.accum_steps > 1: choose one way to split the batch",
        )
        _require(
            self.max_consecutive_nonfinite >= 1, "optim.max_consecutive_nonfinite", "must be >= 1"
        )


PRECISIONS = ("fp32", "bf16", "fp16")
PARALLELISMS = ("ddp", "fsdp")


@dataclass(kw_only=True, slots=True)
class ComputeConfig:
    precision: str = "fp32"
    """fp32; bf16: autocast on CPU and GPU; fp16: autocast with loss scaling (GPU only). Weights,
    optimizer state and the loss itself stay float32."""
    grad_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (open_clip's switch): less
    memory, ~30% more compute. Combines with grad_cache_chunk."""
    compile: bool = False
    """torch.compile the model (the first steps are slow while it compiles)."""
    channels_last: bool = True
    """Channels-last images and weights for convolutional image towers on GPU, where it is
    faster; ignored for transformer towers and on CPU."""
    parallel: str = "ddp"
    """ddp: every rank holds the whole model; fsdp: parameters, gradients and optimizer state are
    sharded over ranks (torch's fully_shard), for models too big to replicate."""
    ddp_static_graph: bool = True
    """Tell DDP the graph is the same every step (true for these models), so it can skip
    per-step bookkeeping. Applied only with one backward per step: DDP's static graph does not
    survive no_sync, which GradCache and accumulation use."""

    def __post_init__(self) -> None:
        _require(
            self.precision in PRECISIONS,
            "compute.precision",
            f"must be one of {', '.join(PRECISIONS)}",
        )
        _require(
            self.parallel in PARALLELISMS,
            "compute.parallel",
            f"must be one of {', '.join(PARALLELISMS)}",
        )


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every_steps: int = 200
    """Save a resumable checkpoint every this many steps (and always at the end)."""
    keep_last: int = 3
    """How many checkpoints to keep; older ones are deleted."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    every_steps: int = 0
    """Evaluate every this many steps (0 = only at the end), on rank 0 while the others wait;
    each evaluation is a line of RUN_DIR/eval.jsonl, the final one also RUN_DIR/eval.json."""
    recall_at: tuple[int, ...] = (1, 5, 10)
    """The k of image<->text recall@k."""
    batch_size: int = 256
    """Images/texts per forward pass during evaluation."""
    chunk_rows: int = 1024
    """Query rows per block of similarity scores: memory is chunk_rows x N, never N x N."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        _require(all(k >= 1 for k in self.recall_at), "eval.recall_at", "every k must be >= 1")
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _require(self.chunk_rows >= 1, "eval.chunk_rows", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    every_steps: int = 10
    """Write metrics (JSONL + TensorBoard) every this many steps."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, "logging.every_steps", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    run_dir: str = "runs/default"
    """Checkpoints, metrics, the exported artifact and eval results go here."""
    steps: int = 1000
    """Optimizer steps to train for (the run is step-based; epochs just follow the data)."""
    seed: int = 0
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu" or "cuda"."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "steps", "must be >= 1")
        _require(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        _require(bool(self.run_dir), "run_dir", "must be set")
        self._check_across_sections()

    def _check_across_sections(self) -> None:
        """Rules between sections: the batch splits must fit the batch; fp16 needs a GPU."""
        batch, optim = self.data.batch_size_per_rank, self.optim
        _require(
            batch % optim.accum_steps == 0,
            "optim.accum_steps",
            f"must divide data.batch_size_per_rank ({batch}) into equal micro-batches",
        )
        _require(
            optim.grad_cache_chunk <= batch,
            "optim.grad_cache_chunk",
            f"must be <= data.batch_size_per_rank ({batch})",
        )
        _require(
            self.loss.hard_negatives or self.data.hard_negatives.generate == "off",
            "data.hard_negatives.generate",
            "generates negatives for loss.hard_negatives=true only: set it too",
        )
        _require(
            not (self.compute.precision == "fp16" and self.device == "cpu"),
            "compute.precision",
            "fp16 needs a CUDA device (loss scaling is GPU only); use bf16 on CPU",
        )


def default() -> TrainConfig:
    """duet-tiny on the built-in synthetic shards (`python -m train.synth --out data/synth`)."""
    return TrainConfig()


def demo() -> TrainConfig:
    """What `make demo` runs: ~4 minutes on 2 CPU cores with `torchrun --nproc_per_node=2`.

    Global batch 2 x 64 = 128 samples/step x 400 steps = 51k samples, ~6 passes over the 8k
    synthetic training samples, at ~220 samples/s.
    """
    cfg = TrainConfig(run_dir="runs/demo", steps=400)
    cfg.optim.warmup_steps = 40
    cfg.checkpoint.every_steps = 100
    return cfg


def smoke() -> TrainConfig:
    """A seconds-long run of the micro model, for tests and for checking a setup."""
    cfg = TrainConfig(run_dir="runs/smoke", steps=30)
    cfg.model.name = "duet-micro"
    cfg.data.batch_size_per_rank = 32
    cfg.data.workers = 0
    cfg.data.shuffle_buffer = 200
    cfg.optim.warmup_steps = 5
    cfg.checkpoint.every_steps = 10
    cfg.logging.every_steps = 5
    cfg.logging.progress = False
    return cfg


RECIPES: dict[str, Callable[[], TrainConfig]] = {"default": default, "demo": demo, "smoke": smoke}
