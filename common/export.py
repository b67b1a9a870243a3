r"""`python -m common.export`: a CLIP model you already have -> a verified model artifact.

    # an open_clip architecture + a weights file (state dict, .safetensors, open_clip_train's
    # epoch_N.pt); OpenAI's weights need the -quickgelu name (their towers use QuickGELU)
    python -m common.export /models/vit-b-32.safetensors --model ViT-B-32 --out artifacts/vit-b-32
    # a checkpoint of our own trainer: the architecture comes from the run's config
    python -m common.export runs/demo/checkpoints/step-00002000.pt --out artifacts/demo-2000
    # an open_clip / Hugging Face hub-layout folder (open_clip_config.json + weights)
    python -m common.export /models/CLIP-ViT-B-32-laion2B-s34B-b79K --out artifacts/laion-b32
    # the same model from the local Hugging Face cache (offline; it is never downloaded)
    python -m common.export hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K --out artifacts/laion-b32
    # a Hugging Face transformers CLIPModel folder (config.json + model.safetensors), converted
    python -m common.export /models/clip-vit-base-patch32 --out artifacts/openai-b32

The artifact is then what every `--model` takes (`serve.build_index`, `train.evaluate`, the
service's DUET_ARTIFACT_DIR). Before it is put in place, a probe image and probe texts are
embedded twice: by open_clip itself, loading the source its own way (in eval mode, with its own
transform and tokenizer), or for a transformers folder by transformers itself, and by our loader
from the new artifact. An artifact whose embeddings differ by more than `--tolerance` is not
written.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw

from common import hf_convert
from common.artifact import OPEN_CLIP_CONFIG_FILE, load_artifact, read_manifest, write_artifact
from common.atomic_dir import replace_dir, staging_dir
from common.hf_text import HF_TOKENIZER_FILES as HF_TOKENIZER_FILES  # was defined here
from common.hf_text import (
    has_tokenizer_files,
    text_cfg_override,
    tokenizer_copier,
)
from common.model import (
    DualEncoder,
    count_parameters,
    model_config,
    normalize,
)
from common.weights import (
    Weights,
    WeightsError,
    load_weights,
    looks_like_transformers_clip,
    read_weights,
)

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
DEFAULT_TOLERANCE = 1e-5
PROBE_TEXTS = ("a photo of a dog.", "a small red circle left of a large blue square")


class ExportError(ValueError):
    """A source that cannot become an artifact, or an artifact that did not verify."""


@dataclass(frozen=True, slots=True)
class Source:
    """A resolved export source: the architecture, the weights, and how open_clip loads it."""

    name: str  # the model's name in the artifact (model_configs/NAME.json)
    config: dict[str, Any]  # open_clip model config
    preprocess: dict[str, Any] | None  # the source's preprocess_cfg; None: the config's default
    weights: Weights
    open_clip_name: str  # what open_clip.create_model_and_transforms is given ...
    open_clip_pretrained: str | None  # ... with this `pretrained` (None: it reads no file)
    folder: Path | None  # a hub-layout folder: where a Hugging Face tokenizer's files may be
    # the embeddings of the source by its own library when that is not open_clip (transformers)
    reference: hf_convert.TransformersReference | None = None

    @property
    def reference_library(self) -> str:
        """The library whose embeddings of the source the artifact must reproduce."""
        return self.reference.library if self.reference is not None else "open_clip"

    @property
    def hf_tokenizer(self) -> str:
        return str(self.config.get("text_cfg", {}).get("hf_tokenizer_name", ""))


def resolve_source(source: str, model: str | None = None, name: str | None = None) -> Source:
    """A file, a hub-layout folder or `hf-hub:ORG/NAME` (from the local cache) -> Source."""
    if source.startswith(HF_HUB_PREFIX):
        repo_id = source[len(HF_HUB_PREFIX) :]
        return _folder_source(cached_hub_folder(repo_id), model, name or repo_id.split("/")[-1])
    path = Path(source)
    if path.is_dir():
        return _folder_source(path, model, name)
    if not path.is_file():
        raise FileNotFoundError(f"{source!r} is not a file, a folder or hf-hub:ORG/NAME")
    weights = read_weights(path)
    if looks_like_transformers_clip(weights.state_dict):
        raise ExportError(
            f"{path} holds a Hugging Face transformers CLIPModel's weights: export the folder "
            f"they came in (config.json, preprocessor_config.json and the tokenizer's files "
            f"beside them; no --model needed), e.g. python -m common.export {path.parent} --out ..."
        )
    arch = model or weights.model_name
    if arch is None:
        raise ExportError(
            f"{path} ({weights.source_format}) needs its architecture: --model NAME "
            "(an open_clip name such as ViT-B-32; open_clip.list_models() lists them)"
        )
    config = dict(model_config(arch))
    bias = weights.state_dict.get("logit_bias")
    if bias is not None and "init_logit_bias" not in config:
        config["init_logit_bias"] = float(bias.reshape(-1)[0])  # a SigLIP-trained model's bias
    # open_clip cannot read our trainer's checkpoints: its reference then loads the same tensors
    # into its own model (see `_open_clip_reference`)
    own = weights.source_format == "duet trainer checkpoint"
    return Source(
        name or arch, config, None, weights, arch, None if own else str(path.resolve()), None
    )


def cached_hub_folder(repo_id: str) -> Path:
    """The folder of `repo_id` in the local Hugging Face cache; nothing is downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise ExportError(
            f"hf-hub:{repo_id} is not in the local Hugging Face cache {constants.HF_HUB_CACHE} "
            f"(HF_HUB_CACHE / HF_HOME choose it); nothing is downloaded here: copy the model's "
            f"folder to this machine and export the folder instead ({type(exc).__name__})"
        ) from None


def _folder_source(folder: Path, model: str | None, name: str | None) -> Source:
    config_path = folder / OPEN_CLIP_CONFIG_FILE
    if not config_path.is_file() and hf_convert.is_transformers_folder(folder):
        return _transformers_source(folder, _safe_name(name or model or folder.resolve().name))
    if not config_path.is_file():
        raise ExportError(
            f"{folder} is neither an open_clip hub-layout folder or artifact "
            f"({OPEN_CLIP_CONFIG_FILE} + weights) nor {hf_convert.LAYOUT}"
        )
    content = json.loads(config_path.read_text())
    if "model_cfg" not in content:
        raise ExportError(f"{config_path} has no model_cfg")
    if (folder / "duet_artifact.json").is_file():
        default_name = read_manifest(folder)["model_name"]
    else:
        default_name = folder.resolve().name
    model_name = _safe_name(name or model or default_name)
    weights = read_weights(folder)
    return Source(
        model_name,
        content["model_cfg"],
        content.get("preprocess_cfg"),
        weights,
        f"local-dir:{folder.resolve()}",
        None,
        folder,
    )


def _transformers_source(folder: Path, model_name: str) -> Source:
    """A transformers CLIPModel folder, converted; transformers' own model is the reference."""
    converted = hf_convert.convert_folder(folder)
    config = converted.config
    if not converted.open_clip_tokenizer:  # another BPE: the artifact carries the folder's files
        config = config | {"text_cfg": config["text_cfg"] | {"hf_tokenizer_name": model_name}}
    weights = Weights(converted.state_dict, converted.weights_path, hf_convert.SOURCE_FORMAT)
    reference = hf_convert.TransformersReference(folder)
    # open_clip cannot read the folder: it is given nothing, and transformers is the reference
    return Source(model_name, config, converted.preprocess, weights, "", None, folder, reference)


def _safe_name(name: str) -> str:
    """A model name usable as a file name (hub ids and folder names may hold '/' or ':')."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"


def build_from_source(src: Source) -> DualEncoder:
    """Our model for `src`: open_clip's module built from the config, the weights loaded."""
    with tempfile.TemporaryDirectory() as tmp:
        # a local-dir folder with a config and no weights: open_clip builds the architecture and
        # its preprocessing from any config, registered name or not, and initialises it randomly
        content = {"model_cfg": src.config, "preprocess_cfg": src.preprocess or {}}
        (Path(tmp) / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(content))
        # open_clip warns that this folder has no weights: they are loaded right below
        with _dropped_root_record(f"Local config loaded, but no CLIP weights found in {tmp}"):
            clip = open_clip.create_model(
                f"local-dir:{tmp}",
                pretrained_image=False,
                pretrained_text=False,
                **text_cfg_override(src.config, src.folder),
            )
    report = load_weights(clip, src.weights)
    log.info("%s: %s", src.weights.path, report.describe())
    log.info("built %s (%.2fM parameters)", src.name, count_parameters(clip) / 1e6)
    return DualEncoder(clip, src.name, int(src.config["embed_dim"]), src.config).eval()


@contextmanager
def _dropped_root_record(message: str) -> Iterator[None]:
    """Drop the one root-logger record (open_clip logs on the root logger) whose message is
    `message`, while the block runs; every other record passes."""

    def keep(record: logging.LogRecord) -> bool:
        return record.getMessage() != message

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def export(
    source: str,
    out_dir: str | Path,
    *,
    model: str | None = None,
    name: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Export `source` to the artifact `out_dir` (replaced) if it verifies; returns a summary."""
    out_dir = Path(out_dir)
    src = resolve_source(source, model, name)
    ours = build_from_source(src)
    staging = staging_dir(out_dir, "verifying")
    provenance = {"exported_from": source, "source_format": src.weights.source_format}
    write_artifact(ours, staging, provenance=provenance, extra_files=_tokenizer_copier(src))
    del ours
    try:
        difference = verify(staging, src)
        if difference > tolerance:
            raise ExportError(
                f"the exported model's embeddings differ from {_owner(src.reference_library)} "
                f"own by {difference:.3g} (tolerance {tolerance:g}); no artifact written"
            )
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "out": str(out_dir),
        "model": src.name,
        "source_format": src.weights.source_format,
        "max_abs_difference": difference,
        "reference": src.reference_library,
    }


@torch.no_grad()
def verify(artifact_dir: Path, src: Source) -> float:
    """Max |difference| between the artifact's embeddings (our loader) and those of the source's
    own library (open_clip, or transformers for its folders), over a probe image and texts."""
    loaded = load_artifact(artifact_dir)
    image = probe_image()
    texts = list(PROBE_TEXTS)
    ours = (
        loaded.model.encode_image(loaded.transform(image)[None]),
        loaded.model.encode_text(loaded.tokenize(texts)),
    )
    if src.reference is not None:
        theirs = src.reference(image, texts)
    else:
        ref_model, ref_transform, ref_tokenize = _open_clip_reference(src)
        theirs = (
            normalize(ref_model.encode_image(ref_transform(image)[None])),
            normalize(ref_model.encode_text(ref_tokenize(texts))),
        )
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))


def _open_clip_reference(src: Source) -> tuple[Any, Any, Any]:
    """open_clip's own model (eval mode), eval transform and tokenizer for the source."""
    # a Hugging Face text tower's transformers config from disk, as everywhere (common.hf_text)
    kwargs: dict[str, Any] = text_cfg_override(src.config, src.folder)
    from_folder = src.open_clip_name.startswith("local-dir:")
    if "init_logit_bias" in src.config and not from_folder:  # a folder's config has it already
        kwargs["init_logit_bias"] = src.config["init_logit_bias"]
    model, _, transform = open_clip.create_model_and_transforms(
        src.open_clip_name,
        pretrained=src.open_clip_pretrained,
        pretrained_image=False,
        pretrained_text=False,
        **kwargs,
    )
    if src.open_clip_pretrained is None and not from_folder:
        model.load_state_dict(src.weights.state_dict, strict=True)
    model.eval()
    return model, transform, open_clip.get_tokenizer(src.open_clip_name)


def probe_image(size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A deterministic non-square RGB image with edges and colours (exercises resize and crop)."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 140, 140), fill=(220, 30, 30))
    draw.rectangle((180, 90, 300, 210), fill=(30, 30, 220))
    return image


def _tokenizer_copier(src: Source) -> Any:
    """For a model with a Hugging Face tokenizer: a function copying its files into the
    artifact, from the source folder or the tokenizer's own folder in the local cache. (The
    text tower's transformers config is written by `write_artifact` from the model itself.)"""
    if not src.hf_tokenizer:
        return None
    folder = src.folder
    if folder is None or not has_tokenizer_files(folder):
        folder = cached_hub_folder(src.hf_tokenizer)
    return tokenizer_copier(folder)


def _owner(name: str) -> str:
    """open_clip -> open_clip's, transformers -> transformers'."""
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m common.export",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "source",
        help="a weights file, a hub-layout folder, a transformers CLIPModel folder or "
        "hf-hub:ORG/NAME (local cache)",
    )
    parser.add_argument("--out", required=True, help="artifact directory to write (replaced)")
    parser.add_argument("--model", help="open_clip architecture of a weights file, e.g. ViT-B-32")
    parser.add_argument("--name", help="the model's name in the artifact (default: derived)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest embedding difference from open_clip's own that is accepted",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("common").setLevel(logging.INFO)
    try:
        summary = export(
            args.source, args.out, model=args.model, name=args.name, tolerance=args.tolerance
        )
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"exported {summary['model']} ({summary['source_format']}) to {summary['out']}; "
        f"embeddings equal {_owner(summary['reference'])} own "
        f"(max difference {summary['max_abs_difference']:.2g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
