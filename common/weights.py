"""Read the weights files people have into open_clip state dicts, and load them with a report.

One reader for every place that starts from existing weights (the trainer's `model.pretrained`,
`python -m common.export`), so both accept the same files and say the same things about them:

- a plain state dict (`.pt`, `.pth`, `.bin`) or a `.safetensors` file, as open_clip saves them;
- an open_clip_train checkpoint (`epoch_N.pt`: `{"state_dict": {"module.visual...": ...}}`);
- a checkpoint of our own trainer (`step-N.pt`: `{"model": {"clip.visual...": ...}, "step", ...}`);
- a folder holding one of those (an artifact, or an open_clip / Hugging Face hub-layout folder).

Wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`, our `clip.`) are removed, and
open_clip's own fix-ups (third-party key conversion, position-embedding resize, scalar vs 1-d
temperature) are applied, so what loads here is what `open_clip.load_checkpoint` would load.
Loading is strict: a missing, unexpected or mis-shaped tensor is an error that names examples,
because a silently partial load trains or serves a model that is not the one asked for.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip.convert import convert_state_dict
from open_clip.model import (
    convert_to_custom_text_state_dict,
    resize_pos_embed,
    resize_text_pos_embed,
)
from torch import nn

log = logging.getLogger(__name__)

# What open_clip looks for in a folder, best first (open_clip.factory._find_checkpoint_in_dir).
FOLDER_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "clip.")
EXAMPLES_SHOWN = 5


class WeightsError(ValueError):
    """A weights file that cannot be read, or whose tensors do not fit the model."""


@dataclass(frozen=True, slots=True)
class Weights:
    """An open_clip state dict read from `path`, the format it came in and, for our own trainer's
    checkpoints, the model name its run used."""

    state_dict: dict[str, torch.Tensor]
    path: Path
    source_format: str
    model_name: str | None = None


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What `load_weights` did: every tensor of the model loaded (strict), from which format."""

    loaded: int
    source_format: str

    def describe(self) -> str:
        return (
            f"{self.loaded} tensors loaded, 0 missing, 0 unexpected (source: {self.source_format})"
        )


def weights_in_folder(folder: Path) -> Path:
    """The weights file of an artifact or hub-layout folder, chosen as open_clip chooses it."""
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
    hint = f" (it has {', '.join(found)})" if found else ""
    raise WeightsError(f"{folder}: no weights file named {' or '.join(FOLDER_WEIGHTS[:3])}{hint}")


def read_weights(path: str | Path) -> Weights:
    """Read a weights file, or the weights of a folder, into a bare open_clip state dict."""
    path = Path(path)
    if path.is_dir():
        path = weights_in_folder(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {str(path)!r} not found: give a local file or folder "
            "(weights are never downloaded at run time)"
        )
    if path.suffix == ".safetensors":
        return Weights(_read_safetensors(path), path, "safetensors")
    content = _torch_load(path)
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        state, source_format, name = content["state_dict"], "open_clip_train checkpoint", None
    elif isinstance(content, dict) and isinstance(content.get("model"), dict) and "step" in content:
        state, source_format = content["model"], "duet trainer checkpoint"
        name = (content.get("config") or {}).get("model", {}).get("name")
    elif (
        isinstance(content, dict)
        and content
        and all(isinstance(v, torch.Tensor) for v in content.values())
    ):
        state, source_format, name = content, "state dict", None
    else:
        raise WeightsError(
            f"{path}: not a state dict, an open_clip_train checkpoint or a duet checkpoint "
            f"(found a {type(content).__name__})"
        )
    return Weights(strip_prefixes(state), path, source_format, name)


def strip_prefixes(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes shared by every key (DDP, torch.compile, our DualEncoder)."""
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def load_weights(clip: nn.Module, weights: Weights) -> LoadReport:
    """Load `weights` into the open_clip model `clip` (strictly; see the module doc)."""
    if looks_like_transformers_clip(weights.state_dict):
        # no architecture name would fit them: their names are transformers', not open_clip's
        raise WeightsError(
            f"{weights.path} holds a Hugging Face transformers CLIPModel's weights: convert its "
            "folder first (python -m common.export FOLDER --out ARTIFACT) and give the artifact"
        )
    try:
        state = open_clip_fixups(clip, dict(weights.state_dict))
    except (AssertionError, RuntimeError, ValueError, KeyError) as exc:  # open_clip asserts
        raise WeightsError(
            f"{weights.path} ({weights.source_format}) does not fit this model: {exc or type(exc)}"
            " (is it the right architecture name?)"
        ) from None
    expected = clip.state_dict()
    unexpected = sorted(set(state) - set(expected))
    # FrozenBatchNorm2d (a locked image tower) has no num_batches_tracked; nothing else may lack
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    wrong_shape = sorted(
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    )
    problems = [
        f"{len(keys)} {what}, e.g. {', '.join(keys[:EXAMPLES_SHOWN])}"
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of the wrong shape", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise WeightsError(
            f"{weights.path} ({weights.source_format}) does not fit this model: "
            + "; ".join(problems)
            + " (is it the right architecture name?)"
        )
    clip.load_state_dict(state, strict=False)
    return LoadReport(len(state), weights.source_format)


def looks_like_transformers_clip(state: dict[str, torch.Tensor]) -> bool:
    """A state dict with transformers' CLIP names (a CLIPModel's weights file)."""
    return any(k.startswith(("vision_model.embeddings.", "text_model.embeddings.")) for k in state)


def open_clip_fixups(clip: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The conversions `open_clip.load_checkpoint` applies before loading (same order)."""
    state = convert_state_dict(clip, state)
    if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):
        param = getattr(clip, name, None)
        if name in state and param is not None and param.ndim != state[name].ndim:
            state[name] = state[name].reshape(param.shape)
    bias = getattr(clip, "logit_bias", None)
    if "logit_bias" not in state and isinstance(bias, torch.Tensor):
        state["logit_bias"] = torch.zeros_like(bias)  # open_clip's choice too
    state.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(state, clip)
    resize_text_pos_embed(state, clip)
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return strip_prefixes(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None


def _torch_load(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers: a weights file runs no code.

    Our own checkpoints also hold RNG states (NumPy arrays), which the restricted unpickler
    refuses; they are read with NumPy's array types allowed, and nothing else.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed it
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32"))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError) as exc:
        raise WeightsError(
            f"{path}: not a readable PyTorch weights file ({str(exc).splitlines()[0]})"
        ) from None
