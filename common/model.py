"""Build open_clip dual encoders (registry names + bundled tiny configs); encode and L2-normalise.

This is the one place embeddings are normalised: every caller (training loss, evaluation, index
build, the service) gets unit vectors from `DualEncoder`, so inner product == cosine similarity.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, HFTextEncoder, MeanPooler
from open_clip.transformer import text_global_pool
from torch import nn

from common.hf_text import text_cfg_override
from common.tokenize import fill_template
from common.weights import load_weights, read_weights

log = logging.getLogger(__name__)

BUNDLED_CONFIG_DIR = Path(__file__).parent / "model_configs"
BUNDLED_MODELS = tuple(sorted(p.stem for p in BUNDLED_CONFIG_DIR.glob("*.json")))
LOCAL_DIR_PREFIX = "local-dir:"
"""open_clip's spelling of "the architecture (and tokenizer) of this artifact / hub folder"."""


@functools.cache
def register_bundled_configs() -> None:
    """Make the bundled tiny configs (duet-tiny, duet-micro) known to open_clip by name."""
    open_clip.add_model_config(BUNDLED_CONFIG_DIR)


def model_config(name: str) -> dict[str, Any]:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) for a registered name, or
    of the artifact or hub-layout folder named `local-dir:FOLDER`."""
    folder = local_dir(name)
    if folder is not None:
        config_path = folder / "open_clip_config.json"
        if not config_path.is_file():
            raise ValueError(f"{name!r}: {folder} has no open_clip_config.json")
        content: dict[str, Any] = json.loads(config_path.read_text())["model_cfg"]
        return content
    register_bundled_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"unknown model {name!r}; bundled: {', '.join(BUNDLED_MODELS)}; "
            f"open_clip has {len(open_clip.list_models())} more (open_clip.list_models())"
        )
    return cfg


def local_dir(name: str) -> Path | None:
    """FOLDER of a `local-dir:FOLDER` model name, else None."""
    return Path(name[len(LOCAL_DIR_PREFIX) :]) if name.startswith(LOCAL_DIR_PREFIX) else None


def display_name(name: str) -> str:
    """The model's name in artifacts: a registered name, or a `local-dir:` artifact's own name
    (its manifest's; a hub-layout folder's: the folder's)."""
    folder = local_dir(name)
    if folder is None:
        return name
    manifest = folder / "duet_artifact.json"
    if manifest.is_file():
        return str(json.loads(manifest.read_text())["model_name"])
    return folder.resolve().name


class OpenClipChatter(logging.Filter):
    """Drops open_clip's INFO lines, which it logs on the root logger (~10 per model load:
    "Parsing model identifier...", "Loading full pretrained weights..."), unless the root logger
    is at DEBUG; and its "No pretrained weights loaded" warning, which is wrong for us: weights
    are loaded right after the architecture is built (`build_model`), or a random start is meant.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}open_clip{os.sep}" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return logging.getLogger().getEffectiveLevel() <= logging.DEBUG
        return "No pretrained weights loaded" not in record.getMessage()


@functools.cache
def quiet_open_clip() -> None:
    """Install `OpenClipChatter` on the root logger (once)."""
    logging.getLogger().addFilter(OpenClipChatter())


quiet_open_clip()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last dimension (embeddings, and means of embeddings)."""
    return F.normalize(x, dim=-1)


class DualEncoder(nn.Module):
    """An open_clip model whose encoders return L2-normalised embeddings.

    `clip` is the unmodified open_clip module, so its state dict is exactly what open_clip loads.
    `config` is its open_clip model config (embed_dim, vision_cfg, text_cfg), which the artifact
    records; by default the registered config of `name`.
    """

    def __init__(
        self, clip: nn.Module, name: str, embed_dim: int, config: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.clip: Any = clip  # open_clip.CLIP / CustomTextCLIP
        self.name = name
        self.embed_dim = embed_dim
        self.config = dict(config) if config is not None else model_config(name)

    @property
    def logit_scale(self) -> nn.Parameter:
        """Log of the inverse temperature, learned (open_clip initialises it to log(1/0.07))."""
        return self.clip.logit_scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, D] unit vectors."""
        return normalize(self.clip.encode_image(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, D] unit vectors.

        In eval mode a batch of short texts runs at its real length (`short_text_length`), not
        the padded context: the same embeddings (within float rounding) for a fraction of the work.
        Training cuts its batches before they reach the device (`cut_text_padding`); tokens
        shorter than the context run over that many positions.
        """
        length = None if self.training else short_text_length(self.clip, tokens)
        if length is not None:
            tokens = tokens[:, :length]
        if tokens.shape[1] >= getattr(self.clip, "context_length", tokens.shape[1]):
            return normalize(self.clip.encode_text(tokens))
        return normalize(encode_text_prefix(self.clip, tokens))

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Image and text embeddings, the log logit scale, and the logit bias (None if none).

        Scale and bias are returned from forward (not read off the module) so that DDP sees them
        used. Only models built with `init_logit_bias` (SigLIP training) have a bias.
        """
        bias = getattr(self.clip, "logit_bias", None)
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale, bias

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float) -> None:
        """Keep exp(logit_scale) in [1, max_scale] (CLIP clamps at 100 after each step)."""
        self.logit_scale.clamp_(0.0, math.log(max_scale))

    def drop_tower_weights(self) -> None:
        """Free both towers' weights in place, once other towers (ONNX Runtime's) run them.

        Every submodule of the open_clip model moves to the meta device (no storage); what
        `serve.encoder.Encoder` reads stays: name, configs, preprocessing and the temperature
        (a parameter of the model itself, as are the small text projection and positions).
        The model cannot run afterwards.
        """
        for tower in self.clip.children():
            tower.to("meta")

    @property
    def weights_dropped(self) -> bool:
        """Whether `drop_tower_weights` ran: the model can no longer run."""
        return any(p.is_meta for p in self.clip.parameters())


@dataclass(frozen=True, slots=True)
class TowerLocks:
    """Which towers fine-tuning leaves frozen, as open_clip_train's --lock-image/--lock-text.

    LiT (Zhai et al. 2022) locks a pretrained image tower and trains the text tower to match it;
    unlocking the last few groups of a locked tower is the usual middle ground.
    """

    image: bool = False
    image_unlocked_groups: int = 0  # the last N layer groups of a locked image tower still train
    image_freeze_bn_stats: bool = False  # BatchNorm running statistics frozen too (ResNet towers)
    text: bool = False
    text_unlocked_layers: int = 0  # the last N layer groups of a locked text tower still train


def lock_towers(clip: Any, locks: TowerLocks) -> None:
    """Freeze what `locks` asks for in the open_clip model `clip` (its own lock methods)."""
    try:
        if locks.image:
            clip.lock_image_tower(
                unlocked_groups=locks.image_unlocked_groups,
                freeze_bn_stats=locks.image_freeze_bn_stats,
            )
        if locks.text:
            clip.lock_text_tower(unlocked_layers=locks.text_unlocked_layers)
    except (AssertionError, NotImplementedError) as exc:  # e.g. partial locking of a ResNet
        raise ValueError(f"cannot lock this model's towers as asked ({locks}): {exc}") from None
    frozen = sum(p.numel() for p in clip.parameters() if not p.requires_grad)
    if frozen:
        log.info(
            "locked towers: %.2fM of %.2fM parameters frozen",
            frozen / 1e6,
            count_parameters(clip) / 1e6,
        )


TEXT_LENGTH_BUCKETS = (8, 16, 24, 32, 48, 64)
"""Lengths that group the rows of a mixed batch (`length_groups`): rows needing up to 8 tokens
run together, then up to 16, and so on; longer ones with the full context."""
PADDING_FREE_POOLERS = (MeanPooler, ClsPooler, ClsLastHiddenStatePooler)
"""Poolers of a Hugging Face tower that read no padding (open_clip's MaxPooler reads it)."""


def short_text_length(clip: Any, tokens: torch.Tensor) -> int | None:
    """The length that keeps each row's pooling token (the batch's longest text), where cutting
    is exact and shorter than the context; else None.

    A CLIP text tower is causal and pools at the end-of-text token (`argmax`: the highest id, or
    `eos`): the padding after that token can change no position up to it, so dropping the
    padding gives the same embedding. A Hugging Face tower (`HFTextEncoder`) masks its padding
    out of attention and of its mean or CLS pooling, and numbers positions from the start: the
    padding after the last real token changes nothing either. Towers that attend both ways
    without such a mask, or pool at the last position, are left alone.
    """
    pooling = text_pooling(clip)
    return None if pooling is None else pooled_length(tokens, *pooling)


def text_pooling(clip: Any) -> tuple[str, int | None] | None:
    """(pool type, end-of-text or padding id) of a text tower whose padding can be cut, else
    None. A Hugging Face tower's is ("padding", its pad id)."""
    text = getattr(clip, "text", None)
    if isinstance(text, HFTextEncoder) and isinstance(text.pooler, PADDING_FREE_POOLERS):
        pad_id = getattr(text.config, "pad_token_id", None)
        return None if pad_id is None else ("padding", int(pad_id))
    if type(clip) is not open_clip.CLIP or getattr(clip, "attn_mask", None) is None:
        return None
    if clip.text_pool_type == "argmax" or (
        clip.text_pool_type == "eos" and clip.text_eos_id is not None
    ):
        return clip.text_pool_type, clip.text_eos_id
    return None


def pooled_length(tokens: torch.Tensor, pool_type: str, eos_id: int | None) -> int | None:
    """The length holding every row's pooling position, or None if that is the full context.

    The exact length, not a rounded-up one: 32 queries of 10 tokens took 30% longer at 16
    positions than at 12 (ViT-B-32, ONNX Runtime), and a new length costs neither runtime
    anything of its own. At least 2: the ONNX towers' length axis starts there.
    """
    needed = max(int(pooled_positions(tokens, pool_type, eos_id).max()) + 1, 2)
    return needed if needed < tokens.shape[1] else None


def pooled_positions(tokens: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """[B, C] token ids -> [B] the position each row pools at (`text_pooling`'s kind)."""
    if pool_type == "padding" and eos_id is not None:  # the last token that is not padding
        real = tokens.ne(eos_id).long() * torch.arange(tokens.shape[1], device=tokens.device)
        return real.amax(dim=-1)
    if pool_type == "argmax" or eos_id is None:
        return tokens.argmax(dim=-1)
    return tokens.eq(eos_id).int().argmax(dim=-1)


def length_groups(tokens: torch.Tensor, pooling: tuple[str, int | None]) -> list[torch.Tensor]:
    """[B, C] token ids -> the row indices of each `TEXT_LENGTH_BUCKETS` bucket (or the full
    context) the rows need, shortest first.

    A batch runs at the length of its longest row: one 60-token text among 31 queries of 8
    tokens makes all 32 cost 60 positions. Encoded group by group, each row costs about its own
    length, with the same embeddings (the cut is exact, `short_text_length`).
    """
    needed = pooled_positions(tokens, *pooling) + 1  # [B]
    buckets = torch.tensor([*TEXT_LENGTH_BUCKETS, tokens.shape[1]], device=tokens.device)
    bucket_of_row = torch.searchsorted(buckets, needed)  # [B] the first bucket >= needed
    return [torch.nonzero(bucket_of_row == b).flatten() for b in bucket_of_row.unique()]


def cut_text_padding(
    pooling: tuple[str, int | None], *token_sets: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Token ids [..., C] cut to one length: the shortest of `TEXT_LENGTH_BUCKETS` (or C) that
    holds every row's pooling position (`text_pooling`'s kind), exact as `short_text_length`.

    What training does to each batch, captions and hard negatives alike, on the CPU before the
    copy to the device: the text tower runs at about the captions' real length rather than the
    context's (captions of ~15 tokens in a context of 77), its embeddings and gradients the same,
    and a compiled step meets a handful of lengths, not one per batch.
    """
    full = token_sets[0].shape[-1]
    rows = [t.flatten(0, -2) for t in token_sets if t.numel()]
    needed = max(int(pooled_positions(r, *pooling).max()) + 1 for r in rows) if rows else 1
    length = next((b for b in TEXT_LENGTH_BUCKETS if b >= needed), full)
    if length >= full:
        return token_sets
    return tuple(t[..., :length].contiguous() for t in token_sets)


def encode_text_prefix(clip: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` over the first L positions: [B, L] ids -> [B, D].

    The same steps, with the positional embedding and the causal mask cut to L. A Hugging Face
    tower takes any length as it is.
    """
    if isinstance(getattr(clip, "text", None), HFTextEncoder):
        return clip.encode_text(tokens)
    length = tokens.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype)  # [B, L, W]
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=clip.text_eos_id)
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(x)
    return x if clip.text_projection is None else x @ clip.text_projection


def build_model(
    name: str,
    *,
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
    locks: TowerLocks | None = None,
) -> DualEncoder:
    """Create model `name` with random weights, or weights from a local file `pretrained`.

    `pretrained` is any weights file or folder `common.weights.read_weights` reads (a state dict,
    safetensors, an open_clip_train or duet checkpoint, an artifact or hub-layout folder); it is
    loaded strictly and what was loaded is logged. Nothing is ever downloaded: the towers' own
    base weights (timm / Hugging Face) are not fetched either. `init_logit_bias` gives the model
    open_clip's learned `logit_bias` (SigLIP); without it the model has none. `locks` freezes
    towers after the weights are loaded (frozen parameters have requires_grad=False).
    `name` may be `local-dir:FOLDER` (an artifact or hub-layout folder): its architecture, with
    a Hugging Face text tower's config and tokenizer from that folder (`common.hf_text`); its
    weights are loaded only when `pretrained` names them too.
    """
    cfg = model_config(name)  # validates the name with a helpful message
    weights = read_weights(pretrained) if pretrained else None  # a bad file fails before building
    kwargs: dict[str, Any] = {}
    if init_logit_scale is not None:
        kwargs["init_logit_scale"] = init_logit_scale
    if init_logit_bias is not None:
        kwargs["init_logit_bias"] = init_logit_bias
    # a Hugging Face text tower is built from its config on disk, never the hub's
    kwargs.update(text_cfg_override(cfg, local_dir(name)))
    clip = open_clip.create_model(
        name,
        device="cpu",
        load_weights=False,  # a local-dir's weights load only as `pretrained`, reported
        pretrained_image=False,
        pretrained_text=False,
        **kwargs,
    )
    if weights is not None:
        report = load_weights(clip, weights)
        log.info("model.pretrained %s: %s", weights.path, report.describe())
    if locks is not None:
        lock_towers(clip, locks)
    clip.to(device)
    log.info("built %s (%.2fM parameters)", name, count_parameters(clip) / 1e6)
    return DualEncoder(clip, display_name(name), int(cfg["embed_dim"]), cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def class_embeddings(
    model: Any,
    tokenize: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """Zero-shot classifier weights [C, D]: each class's prompts embedded, averaged, re-normalised.

    Prompt ensembling (CLIP, section 3.1.4): "a photo of a {}." and its siblings each give an
    embedding of the class name; their normalised mean is a better class prototype than any one.
    """
    if not classnames or not templates:
        raise ValueError("class_embeddings needs at least one class name and one template")
    # `model`: anything with encode_text, e.g. a DualEncoder or ONNX towers (which run on the CPU)
    device = next(model.parameters()).device if isinstance(model, nn.Module) else "cpu"
    # built only as far as a bounded tokenizer reads (common.tokenize): the same tokens
    max_chars = getattr(tokenize, "max_chars", sys.maxsize)
    prompts = [fill_template(t, name, max_chars) for name in classnames for t in templates]
    text = model.encode_text(tokenize(prompts).to(device))  # [C*T, D]
    return normalize(text.view(len(classnames), len(templates), -1).mean(dim=1))
