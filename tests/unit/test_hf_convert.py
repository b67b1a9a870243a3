"""`common.export` of Hugging Face transformers CLIPModel folders: the artifact's embeddings equal
transformers' own, the tokenizer travels when it is not open_clip's, and what is not a CLIPModel
folder gets an error naming what is supported."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
)

from common.artifact import load_artifact
from common.export import ExportError, export, probe_image
from common.hf_convert import ConvertError, open_clip_config
from common.model import build_model
from common.weights import WeightsError
from tests.unit.test_export import random_state, write_source

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["a photo of a dog.", "A Small RED circle, left of the café's blue square!", "x"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not OpenAI's: the export must carry them


def open_clip_bpe() -> tuple[dict[str, int], list[str]]:
    """open_clip's bundled BPE as transformers' CLIPTokenizer files hold it (OpenAI's layout)."""
    vocab = dict(SimpleTokenizer().encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    return vocab, merges


def small_bpe(merge_count: int = 500) -> tuple[dict[str, int], list[str]]:
    """Another CLIP BPE: open_clip's first `merge_count` merges only (a 1,014-token vocabulary)."""
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 1 + merge_count]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_folder(
    folder: Path, bpe: tuple, seed: int, shard_bytes: str | None = None, **text: object
) -> None:
    """A random transformers CLIPModel (2 layers, width 32, 32-pixel images) with its tokenizer
    and image processor, saved as save_pretrained saves them."""
    vocab, merges = bpe
    pairs: list = [tuple(m.split()) for m in merges]  # tokenizers' BPE takes (left, right) pairs
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs)
    tower: dict[str, object] = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    tower["hidden_act"] = text.pop("hidden_act", "quick_gelu")
    tower["layer_norm_eps"] = text.pop("layer_norm_eps", 1e-5)
    text_config = tower | {"vocab_size": len(vocab)} | text
    vision_config = tower | {"image_size": 32, "patch_size": 8}
    config = CLIPConfig(projection_dim=24, text_config=text_config, vision_config=vision_config)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # transformers initialises LayerNorms to 1/0: make them count
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(folder, **({"max_shard_size": shard_bytes} if shard_bytes else {}))
    tokenizer.save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN,
        image_std=STD,
    )  # fmt: skip
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "clip-vit-tiny"
    write_clip_folder(folder, open_clip_bpe(), seed=0)
    return folder


@torch.no_grad()
def transformers_embeddings(folder: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own image and text embeddings (PIL image backend), L2-normalised."""
    model = CLIPModel.from_pretrained(folder).eval()
    pixels = AutoImageProcessor.from_pretrained(folder, backend="pil")(
        images=probe_image(), return_tensors="pt"
    )["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
    image = model.get_image_features(pixel_values=pixels).pooler_output
    text = model.get_text_features(**tokens).pooler_output
    return (
        torch.nn.functional.normalize(image, dim=-1),
        torch.nn.functional.normalize(text, dim=-1),
    )


@torch.no_grad()
def artifact_embeddings(artifact: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    loaded = load_artifact(artifact)
    image = loaded.model.encode_image(loaded.transform(probe_image())[None])
    return image, loaded.model.encode_text(loaded.tokenize(texts))


def test_a_transformers_clip_folder_exports_to_transformers_own_embeddings(
    clip_folder: Path, tmp_path: Path
):
    summary = export(str(clip_folder), tmp_path / "artifact")
    assert summary["reference"] == "transformers" and summary["max_abs_difference"] <= 1e-5
    assert summary["source_format"] == "transformers CLIPModel folder"
    theirs = transformers_embeddings(clip_folder, TEXTS)
    for ours, reference in zip(
        artifact_embeddings(tmp_path / "artifact", TEXTS), theirs, strict=True
    ):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    artifact = tmp_path / "artifact"
    assert not (artifact / "vocab.json").exists()  # OpenAI's BPE: open_clip's own tokenizer
    content = json.loads((artifact / "open_clip_config.json").read_text())
    assert content["preprocess_cfg"]["mean"] == MEAN and content["preprocess_cfg"]["std"] == STD
    # the artifact is open_clip's layout: open_clip alone loads it
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{artifact}")
    with torch.no_grad():
        image = model.eval().encode_image(transform(probe_image())[None])
    torch.testing.assert_close(torch.nn.functional.normalize(image), theirs[0], atol=1e-5, rtol=0)


def test_another_bpe_sharded_weights_gelu_and_eps_export_too(tmp_path: Path):
    """Every non-default branch at once: a tokenizer that is not open_clip's (its files travel),
    weights in shards, exact GELU, LayerNorm eps 1e-6, and an old config's eos_token_id 2."""
    folder = tmp_path / "variant"
    write_clip_folder(
        folder, small_bpe(), seed=1, shard_bytes="200KB", hidden_act="gelu",
        layer_norm_eps=1e-6, eos_token_id=2, bos_token_id=1012,
    )  # fmt: skip
    assert (folder / "model.safetensors.index.json").is_file()
    summary = export(str(folder), tmp_path / "artifact")
    assert summary["max_abs_difference"] <= 1e-5
    artifact = tmp_path / "artifact"
    assert (artifact / "tokenizer.json").is_file()
    config = json.loads((artifact / "open_clip_config.json").read_text())["model_cfg"]
    assert config["quick_gelu"] is False and config["text_cfg"]["norm_kwargs"] == {"eps": 1e-6}
    texts = ["a photo of a dog.", "Café RED"]
    theirs = transformers_embeddings(folder, texts)
    for ours, reference in zip(artifact_embeddings(artifact, texts), theirs, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    expected = AutoTokenizer.from_pretrained(folder)(texts[1])["input_ids"]
    assert load_artifact(artifact).tokenize(texts[1:])[0, : len(expected)].tolist() == expected


def test_the_export_command_prints_no_warning(clip_folder: Path, tmp_path: Path):
    """The command as a user runs it: exit 0, one line out, and nothing on stderr at WARNING
    (open_clip's "no CLIP weights found" of the build step) or transformers' progress bars."""
    done = subprocess.run(
        [sys.executable, "-m", "common.export", str(clip_folder), "--out", str(tmp_path / "a")],
        cwd=ROOT,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "embeddings equal transformers' own" in done.stdout
    assert "WARNING" not in done.stderr and "Loading weights" not in done.stderr, done.stderr


def test_only_the_build_steps_no_weights_warning_is_dropped(tmp_path: Path, caplog):
    source = write_source("safetensors", "duet-micro", random_state("duet-micro"), tmp_path / "s")
    root_filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        export(source, tmp_path / "artifact", model="duet-micro")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert logging.getLogger().filters == root_filters  # dropped during the call only
    empty = tmp_path / "config-only"  # elsewhere open_clip's warning still reaches the log
    empty.mkdir()
    config = {"model_cfg": open_clip.get_model_config("ViT-S-32"), "preprocess_cfg": {}}
    (empty / "open_clip_config.json").write_text(json.dumps(config))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        open_clip.create_model(f"local-dir:{empty}", load_weights=False)
    assert "Local config loaded, but no CLIP weights found" in caplog.text


def test_what_is_not_a_clip_folder_gets_an_error_naming_what_is(clip_folder: Path, tmp_path):
    for model_type, says in [
        ("siglip", "SiglipModel is not converted.*timm/ViT-B-16-SigLIP"),
        ("clip_vision_model", "one tower .*a dual encoder \\(CLIPModel\\)"),
        ("bert", 'model_type "bert" is not CLIP'),
    ]:
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(ConvertError, match=f"{says}.*supported: a transformers CLIPModel"):
            export(str(folder), tmp_path / "a")
    (tmp_path / "neither").mkdir()
    with pytest.raises(ExportError, match="neither an open_clip hub-layout .* nor a transformers"):
        export(str(tmp_path / "neither"), tmp_path / "a")
    with pytest.raises(ExportError, match=f"export the folder .* {clip_folder} --out"):
        export(str(clip_folder / "model.safetensors"), tmp_path / "a", model="ViT-B-32")
    assert not (tmp_path / "a").exists()


def test_the_open_clip_config_follows_transformers_pooling_and_activation():
    tower = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4}
    legacy = CLIPConfig(text_config=tower | {"eos_token_id": 2}, vision_config=tower)
    assert "pool_type" not in open_clip_config(legacy)["text_cfg"]  # argmax: the highest id
    current = CLIPConfig(text_config=tower | {"eos_token_id": 49407}, vision_config=tower)
    text_cfg = open_clip_config(current)["text_cfg"]
    assert (text_cfg["pool_type"], text_cfg["eos_id"]) == ("eos", 49407)
    assert open_clip_config(current)["vision_cfg"]["head_width"] == 16
    mixed = CLIPConfig(text_config=tower | {"hidden_act": "gelu"}, vision_config=tower)
    with pytest.raises(ConvertError, match="one activation for both towers"):
        open_clip_config(mixed)


def test_training_from_a_transformers_folder_says_to_export_it_first(clip_folder: Path):
    # model.pretrained reads weights files; a transformers folder's names fit no architecture,
    # so the error points at the conversion rather than at the architecture name
    with pytest.raises(WeightsError, match=r"python -m common.export FOLDER") as caught:
        build_model("duet-micro", pretrained=clip_folder / "model.safetensors")
    assert "right architecture name" not in str(caught.value)
