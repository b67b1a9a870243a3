"""A Hugging Face transformers `CLIPModel` folder -> open_clip's config, preprocessing, weights.

The folder is what `CLIPModel.save_pretrained` and the hub hold (OpenAI's own CLIP releases and
their fine-tunes): `config.json` (model_type "clip"), `model.safetensors` or `pytorch_model.bin`
(possibly sharded, with an `.index.json`), `preprocessor_config.json` and the tokenizer's files.
Both libraries implement the same network (OpenAI's CLIP ViT), so the conversion is a renaming:

    transformers                                     open_clip (CLIP with a VisionTransformer)
    vision_model.embeddings.class_embedding          visual.class_embedding
    vision_model.embeddings.patch_embedding          visual.conv1
    vision_model.embeddings.position_embedding       visual.positional_embedding
    vision_model.pre_layrnorm / post_layernorm       visual.ln_pre / visual.ln_post
    *.encoder.layers.N.self_attn.{q,k,v}_proj        *.resblocks.N.attn.in_proj_{weight,bias}
    *.encoder.layers.N.self_attn.out_proj            *.resblocks.N.attn.out_proj
    *.layer_norm1 / layer_norm2 / mlp.fc1 / mlp.fc2  *.ln_1 / ln_2 / mlp.c_fc / mlp.c_proj
    visual_projection.weight (Linear, [E, W])        visual.proj ([W, E], transposed)
    text_model.embeddings.token_/position_embedding  token_embedding / positional_embedding
    text_model.final_layer_norm                      ln_final
    text_projection.weight (Linear, [E, W])          text_projection ([W, E], transposed)
    logit_scale                                      logit_scale

The export verifies the result against transformers' own `get_image_features` /
`get_text_features`, with transformers' own image processor and tokenizer (`TransformersReference`).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from common.weights import read_weights

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SOURCE_FORMAT = "transformers CLIPModel folder"
LAYOUT = 'a transformers CLIPModel folder (config.json with model_type "clip" + model.safetensors'
LAYOUT += " or pytorch_model.bin + preprocessor_config.json + tokenizer files)"
OPEN_CLIP_EPS = 1e-5  # open_clip's LayerNorm default; another eps goes into norm_kwargs
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json has them
TOWER_PREFIXES = (("vision_model.", "visual."), ("text_model.", ""))
RENAMES = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: transformers' spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
TRANSPOSED = {
    "visual_projection.weight": "visual.proj",
    "text_projection.weight": "text_projection",
}
LAYER_RENAMES = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
# What other transformers model types are, and what to give instead
OTHER_MODEL_TYPES = {
    "siglip": "a transformers SiglipModel is not converted (open_clip builds SigLIP's image tower "
    "as a named timm model and tokenizes with SigLIP's SentencePiece vocabulary); export "
    "open_clip's own release of the model instead, a hub-layout folder such as "
    "timm/ViT-B-16-SigLIP (open_clip_config.json + open_clip_model.safetensors)",
    "clip_vision_model": "it holds one tower (CLIPVisionModel / CLIPVisionModelWithProjection): "
    "a dual encoder (CLIPModel) with both towers is needed",
    "clip_text_model": "it holds one tower (CLIPTextModel / CLIPTextModelWithProjection): "
    "a dual encoder (CLIPModel) with both towers is needed",
}
OTHER_MODEL_TYPES["siglip2"] = OTHER_MODEL_TYPES["siglip"]


class ConvertError(ValueError):
    """A transformers folder that is not a CLIPModel open_clip can build."""


@dataclass(frozen=True, slots=True)
class Converted:
    """A transformers CLIPModel folder in open_clip's terms."""

    config: dict[str, Any]  # open_clip model config
    preprocess: dict[str, Any]  # open_clip preprocess_cfg
    state_dict: dict[str, torch.Tensor]  # open_clip CLIP state dict
    weights_path: Path
    open_clip_tokenizer: bool  # the folder's BPE is open_clip's built-in one


def is_transformers_folder(folder: Path) -> bool:
    """A folder with a transformers config.json (model_type set), whatever the model."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return "model_type" in json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def convert_folder(folder: Path) -> Converted:
    """Read and convert a transformers CLIPModel folder (see the module doc)."""
    hf_config = clip_config(folder)
    config = open_clip_config(hf_config)
    preprocess = preprocess_config(folder)
    crop = preprocess["size"] if isinstance(preprocess["size"], list) else [preprocess["size"]] * 2
    if crop != [config["vision_cfg"]["image_size"]] * 2:
        raise ConvertError(
            f"{folder}: {PREPROCESSOR_FILE} makes {crop[0]}x{crop[1]} pixels; the image tower "
            f"takes {config['vision_cfg']['image_size']}"
        )
    state, weights_path = read_transformers_weights(folder)
    converted = convert_state_dict(state)
    return Converted(config, preprocess, converted, weights_path, has_open_clip_bpe(folder))


def clip_config(folder: Path) -> Any:
    """transformers' CLIPConfig of the folder (its defaults filled in), or a ConvertError that
    says what the folder is and what is supported."""
    from transformers import CLIPConfig

    model_type = json.loads((folder / CONFIG_FILE).read_text()).get("model_type")
    if model_type != "clip":
        why = OTHER_MODEL_TYPES.get(model_type, f'model_type "{model_type}" is not CLIP')
        raise ConvertError(f"{folder}: {why}; supported: {LAYOUT}")
    return CLIPConfig.from_pretrained(folder)


def open_clip_config(hf_config: Any) -> dict[str, Any]:
    """The open_clip model config of a transformers CLIPConfig (same network, other names)."""
    vision, text = hf_config.vision_config, hf_config.text_config
    acts = {vision.hidden_act, text.hidden_act}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise ConvertError(
            f"activations {vision.hidden_act!r} (vision) and {text.hidden_act!r} (text): open_clip "
            "builds CLIP with one activation for both towers, quick_gelu or gelu"
        )
    if vision.num_channels != 3:
        raise ConvertError(f"{vision.num_channels} image channels: open_clip takes RGB images")
    vision_cfg = {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "width": vision.hidden_size,
        "layers": vision.num_hidden_layers,
        "head_width": _head_width(vision, "vision"),
        "mlp_ratio": _mlp_ratio(vision, "vision"),
    }
    text_cfg = {
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        "width": text.hidden_size,
        "heads": text.num_attention_heads,
        "layers": text.num_hidden_layers,
        "mlp_ratio": _mlp_ratio(text, "text"),
    }
    _head_width(text, "text")
    # transformers pools at the first end-of-text id, except for configs saved with the old
    # eos_token_id 2, where it pools at the highest id (open_clip's default, argmax)
    if text.eos_token_id != 2:
        text_cfg.update(pool_type="eos", eos_id=text.eos_token_id)
    for cfg, tower in ((vision_cfg, vision), (text_cfg, text)):
        if tower.layer_norm_eps != OPEN_CLIP_EPS:
            cfg["norm_kwargs"] = {"eps": tower.layer_norm_eps}
    return {
        "embed_dim": hf_config.projection_dim,
        "quick_gelu": vision.hidden_act == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }


def _head_width(tower: Any, what: str) -> int:
    if tower.hidden_size % tower.num_attention_heads:
        raise ConvertError(
            f"{what} width {tower.hidden_size} is not a multiple of its "
            f"{tower.num_attention_heads} heads"
        )
    return int(tower.hidden_size // tower.num_attention_heads)


def _mlp_ratio(tower: Any, what: str) -> float:
    """intermediate_size / hidden_size, as open_clip rebuilds it: int(width * ratio)."""
    ratio = tower.intermediate_size / tower.hidden_size
    if int(tower.hidden_size * ratio) != tower.intermediate_size:
        raise ConvertError(
            f"{what} MLP width {tower.intermediate_size} is not int({tower.hidden_size} * ratio) "
            "for any float ratio open_clip can be given"
        )
    return ratio


def preprocess_config(folder: Path) -> dict[str, Any]:
    """open_clip's preprocess_cfg for the folder's preprocessor_config.json (CLIPImageProcessor:
    resize the shortest side, center-crop a square; or resize to a fixed height x width)."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        raise ConvertError(f"{folder}: no {PREPROCESSOR_FILE} (the image preprocessing); {LAYOUT}")
    cfg = json.loads(path.read_text())
    if not cfg.get("do_resize", True) or not cfg.get("do_rescale", True):
        raise ConvertError(f"{path}: open_clip always resizes and scales pixels to [0, 1]")
    if abs(cfg.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise ConvertError(f"{path}: rescale_factor {cfg['rescale_factor']} is not 1/255")
    resample = cfg.get("resample", 3)
    if resample not in PIL_RESAMPLE:
        raise ConvertError(f"{path}: resample {resample} (open_clip has bicubic and bilinear)")
    normalize = cfg.get("do_normalize", True)
    preprocess: dict[str, Any] = {
        "mean": list(cfg.get("image_mean", [0.0] * 3)) if normalize else [0.0] * 3,
        "std": list(cfg.get("image_std", [1.0] * 3)) if normalize else [1.0] * 3,
        "interpolation": PIL_RESAMPLE[resample],
    }
    return preprocess | _resize(cfg, path)


def _resize(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """open_clip's size and resize_mode for transformers' size / crop_size / do_center_crop."""
    size = cfg.get("size", 224)
    size = {"shortest_edge": size} if isinstance(size, int) else size  # an old config's int
    crop = cfg.get("crop_size", 224)
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    if "shortest_edge" in size and cfg.get("do_center_crop", True):
        if not crop["height"] == crop["width"] == size["shortest_edge"]:
            raise ConvertError(
                f"{path}: resizing the shortest side to {size['shortest_edge']} then cropping "
                f"{crop['height']}x{crop['width']}: open_clip crops the size it resizes to"
            )
        return {"size": size["shortest_edge"], "resize_mode": "shortest"}
    if "height" in size and not cfg.get("do_center_crop", True):
        return {"size": [size["height"], size["width"]], "resize_mode": "squash"}
    raise ConvertError(f"{path}: size {size}, do_center_crop {cfg.get('do_center_crop', True)}")


def read_transformers_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The folder's state dict, from one file or from the shards its index names."""
    for index_name in SHARD_INDEXES:
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(read_weights(folder / shard).state_dict)
            return state, folder / index_name
    weights = read_weights(folder)
    return weights.state_dict, weights.path


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel names -> open_clip CLIP names (the table of the module doc)."""
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # "...resblocks.N.attn.in_proj_weight" -> q, k, v
    unknown = []
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue  # a constant buffer that older transformers versions saved
        if key in RENAMES:
            converted[RENAMES[key]] = value
        elif key in TRANSPOSED:
            converted[TRANSPOSED[key]] = value.T.contiguous()  # Linear [E, W] -> matrix [W, E]
        elif (target := _layer_key(key)) is None:
            unknown.append(key)
        elif target[1]:
            qkv.setdefault(target[0], {})[target[1]] = value
        else:
            converted[target[0]] = value
    if unknown:
        raise ConvertError(
            f"{len(unknown)} tensors that are not a CLIPModel's, e.g. {', '.join(unknown[:5])}"
        )
    for key, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ConvertError(f"{key}: only {'/'.join(sorted(parts))} of q, k, v projections")
        converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # [3W, W] or [3W]
    return converted


def _layer_key(key: str) -> tuple[str, str] | None:
    """(open_clip key, "q"/"k"/"v" or "") of a transformer layer's tensor, else None."""
    for hf_prefix, open_clip_prefix in TOWER_PREFIXES:
        layers = f"{hf_prefix}encoder.layers."
        if not key.startswith(layers):
            continue
        number, _, name = key[len(layers) :].partition(".")
        block = f"{open_clip_prefix}transformer.resblocks.{number}."
        for projection in ("q", "k", "v"):
            for kind in ("weight", "bias"):
                if name == f"self_attn.{projection}_proj.{kind}":
                    return f"{block}attn.in_proj_{kind}", projection
        for old, new in LAYER_RENAMES.items():
            if name.startswith(old):
                return block + new + name[len(old) :], ""
    return None


def has_open_clip_bpe(folder: Path) -> bool:
    """Whether the folder's BPE vocabulary and merges are open_clip's built-in ones (OpenAI's),
    so open_clip's own tokenizer gives the same ids."""
    vocab, merges = folder_bpe(folder)
    return (vocab, merges) == open_clip_bpe()


def folder_bpe(folder: Path) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) from vocab.json + merges.txt, or from tokenizer.json."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        return vocab, [m for m in lines if m and not m.startswith("#version")]
    if (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return model.get("vocab", {}), merges
    raise ConvertError(f"{folder}: no tokenizer (vocab.json + merges.txt, or tokenizer.json)")


@cache
def open_clip_bpe() -> tuple[dict[str, int], list[str]]:
    """open_clip's bundled BPE (OpenAI's), as a transformers CLIPTokenizer's files hold it."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    vocab = dict(SimpleTokenizer().encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")  # the same ids, OpenAI's spelling
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]  # SimpleTokenizer's own slice
    return vocab, merges


@dataclass(frozen=True, slots=True)
class TransformersReference:
    """transformers' own embeddings of the folder's model: the export's reference.

    Pixels come from the PIL backend of transformers' CLIPImageProcessor: PIL's resize is what
    CLIP was trained with and what open_clip uses (the same pixels, exactly). transformers 5's
    default backend (torchvision) resizes tensors with torch's antialiased bicubic, which rounds
    some pixels one level (of 255) away from PIL's; through a small random CLIP that moved the
    image embedding by 1.4e-4, over the export's 1e-5, for a difference that is not the model's.
    """

    folder: Path
    library: str = "transformers"

    @torch.no_grad()
    def __call__(self, image: Image.Image, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, E] image and [len(texts), E] text embeddings, L2-normalised."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
        from transformers.utils import logging as transformers_logging

        from common.model import normalize

        bar_was_on = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # "Loading weights" on stderr, every export
        try:
            model = CLIPModel.from_pretrained(self.folder, dtype=torch.float32).eval()
        finally:
            if bar_was_on:
                transformers_logging.enable_progress_bar()
        processor = AutoImageProcessor.from_pretrained(self.folder, backend="pil")
        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        context_length = model.config.text_config.max_position_embeddings
        tokens = tokenizer(
            texts, padding=True, truncation=True, max_length=context_length, return_tensors="pt"
        )
        image_features = _pooled(model.get_image_features(pixel_values=pixels))
        text_features = _pooled(model.get_text_features(**tokens))
        return normalize(image_features), normalize(text_features)


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns the projected features as `pooler_output`; 4 returned a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
