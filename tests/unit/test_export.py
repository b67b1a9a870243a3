"""`common.export`: every source format becomes an artifact whose embeddings equal open_clip's own;
`model.pretrained` reads the same formats; tower locks freeze what they say."""

import json
import logging
import shutil
import stat
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from common import export as export_module
from common.artifact import load_artifact
from common.config import validate
from common.export import ExportError, export, probe_image
from common.model import TowerLocks, build_model, model_config, normalize
from common.weights import WeightsError, read_weights
from train.config import OptimConfig, smoke
from train.optimizer import build_optimizer
from train.trainer import Trainer


def random_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a randomly initialised open_clip `name` (eval statistics perturbed, so
    a loader that stays in train mode or drops BatchNorm buffers is caught)."""
    torch.manual_seed(seed)
    model = build_model(name).clip
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_source(kind: str, name: str, state: dict[str, torch.Tensor], root: Path) -> str:
    """`state` saved the way `kind` of source stores it; returns what export is given."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "state_dict":
        torch.save(state, root / "weights.pt")
        return str(root / "weights.pt")
    if kind == "safetensors":
        save_file(state, str(root / "weights.safetensors"))
        return str(root / "weights.safetensors")
    if kind == "open_clip_train":
        wrapped = {"module." + k: v for k, v in state.items()}
        torch.save({"epoch": 3, "name": "run", "state_dict": wrapped}, root / "epoch_3.pt")
        return str(root / "epoch_3.pt")
    if kind == "duet_checkpoint":
        checkpoint = {
            "step": 7,
            "model": {"clip." + k: v for k, v in state.items()},
            "config": {"model": {"name": name}},
            "rng": {"numpy": np.random.get_state()},
        }
        torch.save(checkpoint, root / "step-00000007.pt")
        return str(root / "step-00000007.pt")
    folder = root / "hub"
    write_hub_folder(name, state, folder)
    return str(folder)


def write_hub_folder(name: str, state: dict[str, torch.Tensor], folder: Path) -> None:
    """open_clip's hub layout: open_clip_config.json + open_clip_pytorch_model.bin, with a
    preprocessing that differs from the model's default (the export must carry it)."""
    folder.mkdir(parents=True)
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    config = {"model_cfg": open_clip.get_model_config(name), "preprocess_cfg": preprocess}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(state, folder / "open_clip_pytorch_model.bin")


def open_clip_embeddings(model_name: str, pretrained: str | None) -> tuple[torch.Tensor, ...]:
    """What open_clip itself gives for the probe image and texts, in eval mode."""
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model.eval()
    tokenize = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        image = normalize(model.encode_image(transform(probe_image())[None]))
        text = normalize(model.encode_text(tokenize(["a red circle", "a blue square"])))
    return image, text


def artifact_embeddings(artifact: Path) -> tuple[torch.Tensor, ...]:
    loaded = load_artifact(artifact)
    assert not loaded.model.training and not loaded.model.clip.training
    with torch.no_grad():
        image = loaded.model.encode_image(loaded.transform(probe_image())[None])
        text = loaded.model.encode_text(loaded.tokenize(["a red circle", "a blue square"]))
    return image, text


KINDS = ("state_dict", "safetensors", "open_clip_train", "duet_checkpoint", "hub_folder")


@pytest.mark.parametrize("name", ["duet-micro", "duet-tiny"])  # a ViT, a ResNet with BatchNorm
@pytest.mark.parametrize("kind", KINDS)
def test_every_source_format_exports_to_open_clips_own_embeddings(
    kind: str, name: str, tmp_path: Path
):
    state = random_state(name)
    source = write_source(kind, name, state, tmp_path / "source")
    model_arg = None if kind in ("duet_checkpoint", "hub_folder") else name
    summary = export(source, tmp_path / "artifact", model=model_arg)
    assert summary["max_abs_difference"] <= 1e-5
    if kind == "hub_folder":
        reference = open_clip_embeddings(f"local-dir:{source}", None)
    else:  # open_clip reads the plain file; our checkpoint's tensors are the same state
        save_file(state, str(tmp_path / "plain.safetensors"))
        reference = open_clip_embeddings(name, str(tmp_path / "plain.safetensors"))
    for ours, theirs in zip(artifact_embeddings(tmp_path / "artifact"), reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_standard_open_clip_architecture_exports(tmp_path: Path):
    state = random_state("ViT-S-32")
    source = write_source("safetensors", "ViT-S-32", state, tmp_path / "source")
    export(source, tmp_path / "artifact", model="ViT-S-32")
    reference = open_clip_embeddings("ViT-S-32", source)
    for ours, theirs in zip(artifact_embeddings(tmp_path / "artifact"), reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    manifest = json.loads((tmp_path / "artifact" / "duet_artifact.json").read_text())
    assert manifest["model_name"] == "ViT-S-32" and manifest["embed_dim"] == 384
    assert manifest["provenance"]["source_format"] == "safetensors"


def test_hf_hub_names_resolve_from_the_local_cache_only(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ExportError, match=f"not in the local Hugging Face cache {cache}"):
        export("hf-hub:someone/duet-micro-clip", tmp_path / "artifact")
    # the cache's own layout: models--ORG--NAME/{refs/main, snapshots/REVISION/...}
    repo = cache / "models--someone--duet-micro-clip"
    revision = "0123456789abcdef0123456789abcdef01234567"
    write_hub_folder("duet-micro", random_state("duet-micro"), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    summary = export("hf-hub:someone/duet-micro-clip", tmp_path / "artifact")
    assert summary["model"] == "duet-micro-clip" and summary["max_abs_difference"] <= 1e-5
    reference = open_clip_embeddings(f"local-dir:{repo / 'snapshots' / revision}", None)
    for ours, theirs in zip(artifact_embeddings(tmp_path / "artifact"), reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_an_artifact_that_does_not_verify_is_not_written(tmp_path: Path, monkeypatch):
    """A loader that forgot eval mode (BatchNorm in train mode) must not produce an artifact."""
    source = write_source("safetensors", "duet-tiny", random_state("duet-tiny"), tmp_path / "s")

    def train_mode_loader(path, **kwargs):
        loaded = load_artifact(path, **kwargs)
        loaded.model.train()
        return loaded

    monkeypatch.setattr(export_module, "load_artifact", train_mode_loader)
    with pytest.raises(ExportError, match="differ from open_clip's own"):
        export(source, tmp_path / "artifact", model="duet-tiny")
    assert not (tmp_path / "artifact").exists()
    assert not list(tmp_path.glob(".artifact*"))  # no staging left behind


def test_sources_that_do_not_fit_get_one_clear_error(tmp_path: Path):
    source = write_source("state_dict", "duet-micro", random_state("duet-micro"), tmp_path / "s")
    with pytest.raises(ExportError, match="needs its architecture: --model NAME"):
        export(source, tmp_path / "a")
    with pytest.raises(WeightsError, match="does not fit this model"):
        export(source, tmp_path / "a", model="duet-tiny")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="not a readable PyTorch weights file"):
        read_weights(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model("duet-micro", pretrained=tmp_path / "missing.pt")


def test_export_cli_and_readable_files(tmp_path: Path, capsys):
    source = write_source("safetensors", "duet-micro", random_state("duet-micro"), tmp_path / "s")
    out = tmp_path / "artifact"
    assert export_module.main([source, "--model", "duet-micro", "--out", str(out)]) == 0
    assert "embeddings equal open_clip's own" in capsys.readouterr().out
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    assert export_module.main([source, "--out", str(out)]) == 2  # no --model: one line, exit 2
    assert capsys.readouterr().err.startswith("error: ")


def test_pretrained_weights_are_loaded_strictly_and_reported(tmp_path: Path, caplog):
    state = random_state("duet-micro", seed=3)
    source = write_source("open_clip_train", "duet-micro", state, tmp_path / "s")
    with caplog.at_level(logging.INFO, logger="common.model"):
        model = build_model("duet-micro", pretrained=source)
    assert f"{len(state)} tensors loaded, 0 missing, 0 unexpected" in caplog.text
    assert "open_clip_train checkpoint" in caplog.text
    for key, value in model.clip.state_dict().items():
        torch.testing.assert_close(value, state[key])


@pytest.mark.parametrize("kind", ["state_dict", "safetensors", "duet_checkpoint"])
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("drop", "1 missing, e.g. text_projection"),
        ("add", "1 unexpected, e.g. visual.extra_head.weight"),
    ],
)
def test_a_missing_or_unexpected_tensor_is_refused_by_name(tmp_path: Path, kind, change, named):
    """A partial load would serve random weights for what is missing (and ignore what is extra)
    without a word: both are errors that name the tensor, wherever weights are read."""
    state = random_state("duet-micro")
    if change == "drop":
        del state["text_projection"]
    else:
        state["visual.extra_head.weight"] = torch.zeros(3, 3)
    source = write_source(kind, "duet-micro", state, tmp_path / "s")
    with pytest.raises(WeightsError, match=f"does not fit this model: {named}"):
        build_model("duet-micro", pretrained=source)
    with pytest.raises(WeightsError, match=f"does not fit this model: {named}"):
        export(source, tmp_path / "artifact", model="duet-micro")
    assert not (tmp_path / "artifact").exists()


def step(model, optimizer) -> None:
    """One contrastive step on a fixed batch (images [6, 3, H, W], six captions)."""
    size = model.clip.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer(model.name)([f"a {c} shape" for c in "abcdef"])
    image, text, scale, _ = model(images, tokens)
    logits = scale.exp() * image @ text.T
    labels = torch.arange(6)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss = loss + torch.nn.functional.cross_entropy(logits.T, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize(
    ("name", "locks", "frozen_prefixes", "trained_prefixes"),
    [
        ("duet-micro", TowerLocks(image=True), ("clip.visual.",), ("clip.transformer.",)),
        (
            "duet-micro",
            TowerLocks(image=True, image_unlocked_groups=1),
            ("clip.visual.conv1", "clip.visual.transformer.resblocks.0"),
            ("clip.visual.proj", "clip.transformer."),
        ),
        (
            "duet-micro",
            TowerLocks(text=True),
            ("clip.transformer.", "clip.token"),
            ("clip.visual",),
        ),
        (
            "duet-tiny",
            TowerLocks(image=True, image_freeze_bn_stats=True),
            ("clip.visual.",),
            ("clip.transformer.",),
        ),
    ],
)
def test_locked_towers_do_not_change_while_the_rest_trains(
    name, locks, frozen_prefixes, trained_prefixes
):
    torch.manual_seed(0)
    model = build_model(name, locks=locks)
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        step(model, optimizer)
    after = model.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if key.startswith(frozen_prefixes):
            assert not changed, f"{key} is locked but changed"  # BatchNorm statistics included
        elif key.startswith(trained_prefixes) and "num_batches" not in key:
            assert changed, f"{key} should train"
    for param_name, param in model.named_parameters():
        assert (id(param) in in_optimizer) == param.requires_grad, param_name


def test_fine_tuning_from_an_artifact_with_a_locked_image_tower(synth_dir: Path, tmp_path: Path):
    """The trainer starts from an artifact, trains the text tower only, and exports a model
    whose image tower is the artifact's (frozen BatchNorm statistics included)."""
    source = write_source("safetensors", "duet-tiny", random_state("duet-tiny"), tmp_path / "s")
    export(source, tmp_path / "base", model="duet-tiny")
    cfg = smoke()
    cfg.run_dir, cfg.device, cfg.steps = str(tmp_path / "run"), "cpu", 3
    cfg.model.name, cfg.model.pretrained = "duet-tiny", str(tmp_path / "base")
    cfg.model.lock_image, cfg.model.lock_image_freeze_bn_stats = True, True
    cfg.data.train_shards = f"{synth_dir}/train/shard-{{000000..000001}}.tar"
    cfg.data.val_shards = cfg.data.zeroshot_file = ""
    cfg.data.batch_size_per_rank, cfg.data.shuffle_buffer = 8, 0
    cfg.logging.tensorboard = False
    validate(cfg)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    base = load_artifact(tmp_path / "base").model.clip.state_dict()
    tuned = load_artifact(tmp_path / "run" / "artifact").model.clip.state_dict()
    for key, value in base.items():
        if key.startswith("visual.") and "num_batches" not in key:
            torch.testing.assert_close(tuned[key], value, atol=0, rtol=0)
    assert not torch.equal(tuned["text_projection"], base["text_projection"])
    base_images, _ = artifact_embeddings(tmp_path / "base")
    tuned_images, _ = artifact_embeddings(tmp_path / "run" / "artifact")
    torch.testing.assert_close(tuned_images, base_images, atol=1e-6, rtol=0)


def test_a_hugging_face_tokenizer_travels_inside_the_artifact(tmp_path: Path, monkeypatch):
    """A model whose tokenizer is a Hugging Face one, from the local cache: its files are copied
    into the artifact, which then tokenizes with the cache gone."""
    import huggingface_hub.constants
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["red", "blue", "green", "circle", "square", "triangle"]
    words += ["a", "photo", "of", "the", "dog"]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}, "[EOT]": 14}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")
    model_cfg = model_config("duet-micro")
    model_cfg["text_cfg"].update(vocab_size=len(vocab) + 1, hf_tokenizer_name="someone/words")
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--someone--duet-words"
    snapshot = repo / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {}}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    clip = open_clip.create_model(f"local-dir:{snapshot}")
    save_file(dict(clip.state_dict()), str(snapshot / "open_clip_model.safetensors"))
    fast.save_pretrained(snapshot)  # an open_clip hub repo carries its tokenizer's files

    summary = export("hf-hub:someone/duet-words", tmp_path / "artifact")
    assert summary["max_abs_difference"] <= 1e-5
    assert (tmp_path / "artifact" / "tokenizer.json").is_file()
    shutil.rmtree(cache)
    tokens = load_artifact(tmp_path / "artifact").tokenize(["a red circle"])
    assert tokens[0, :3].tolist() == fast("a red circle")["input_ids"][:3]
