"""Write and read the model artifact: open_clip-loadable weights + model config + preprocessing.

An artifact is a directory:

    open_clip_model.safetensors   the open_clip state dict (no wrapper prefixes)
    open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": ...}: open_clip's own layout,
                                  so `open_clip.create_model_and_transforms("local-dir:DIR")` works
    model_configs/NAME.json       the bare model config: `open_clip.add_model_config(...)`, then
                                  `create_model_and_transforms(NAME, pretrained=DIR/WEIGHTS)`
    hf_text_config/config.json    only for a Hugging Face text tower (multilingual models): its
                                  transformers config, so loading never asks the hub
                                  (`common.hf_text`); the tokenizer's files lie beside it
    duet_artifact.json            our manifest: format version, model name, embed dim, tokenizer
                                  context length, provenance (training step, config)

It is written to a temporary sibling directory and renamed into place, so a reader never sees a
half-written artifact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from common.atomic_dir import replace_dir, staging_dir
from common.hf_text import text_cfg_override, write_text_config
from common.model import DualEncoder
from common.preprocess import (
    Transform,
    image_transform,
    preprocess_config,
    preprocess_dict,
    tokenizer,
)
from common.tokenize import BoundedTokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
MANIFEST_FILE = "duet_artifact.json"
MODEL_CONFIG_DIR = "model_configs"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """Everything inference needs: the model, its eval transform and tokenizer, and the manifest."""

    model: DualEncoder
    transform: Transform
    tokenize: BoundedTokenizer
    manifest: dict[str, Any]


def write_artifact(
    model: DualEncoder,
    out_dir: str | Path,
    *,
    provenance: dict[str, Any],
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Export `model` to `out_dir` (replaced if it exists) and return the path.

    `extra_files(dir)` adds files (a Hugging Face tokenizer's) to the artifact before it is
    renamed into place.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model_cfg = dict(model.config)
    if getattr(model.clip, "logit_bias", None) is not None:
        # open_clip creates the learned bias (SigLIP) only when the config asks for one
        model_cfg["init_logit_bias"] = float(model.clip.logit_bias.detach().reshape(-1)[0])
    tmp = staging_dir(out_dir)
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.clip.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        preprocess = preprocess_dict(preprocess_config(model.clip))
        _write_json(
            tmp / OPEN_CLIP_CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
        )
        (tmp / MODEL_CONFIG_DIR).mkdir()
        _write_json(tmp / MODEL_CONFIG_DIR / f"{model.name}.json", model_cfg)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_name": model.name,
            "embed_dim": model.embed_dim,
            "context_length": int(model_cfg["text_cfg"].get("context_length", 77)),
            "image_size": preprocess["size"],
            "weights": WEIGHTS_FILE,
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
            "provenance": provenance,
        }
        _write_json(tmp / MANIFEST_FILE, manifest)
        write_text_config(model.clip, tmp)
        if extra_files is not None:
            extra_files(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported model artifact to %s", out_dir)
    return out_dir


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """The manifest of an artifact, with a clear error when the directory is not one."""
    path = Path(artifact_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{artifact_dir} is not a model artifact (no {MANIFEST_FILE})")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: artifact format {manifest.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    return manifest


def load_artifact(artifact_dir: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an artifact for inference, in eval mode, through open_clip's own local-dir loader.

    Eval mode matters: a tower with BatchNorm (duet-tiny's ResNet, open_clip's RN50) normalises
    with the batch's statistics in train mode, which changes every embedding.
    """
    artifact_dir = Path(artifact_dir).resolve()
    manifest = read_manifest(artifact_dir)
    config = json.loads((artifact_dir / OPEN_CLIP_CONFIG_FILE).read_text())["model_cfg"]
    clip = open_clip.create_model(
        f"local-dir:{artifact_dir}",
        device=device,
        pretrained_image=False,
        pretrained_text=False,
        **text_cfg_override(config, artifact_dir),  # a Hugging Face tower's config: its own copy
    )
    model = DualEncoder(clip, manifest["model_name"], int(manifest["embed_dim"]), config).eval()
    transform = image_transform(preprocess_config(clip), train=False)
    return LoadedModel(model, transform, tokenizer(f"local-dir:{artifact_dir}"), manifest)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
