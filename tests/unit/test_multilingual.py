"""Multilingual models (open_clip with a Hugging Face text tower, the layout of
`xlm-roberta-base-ViT-B-32`): export, offline loading, fine-tuning, index and search.

The model is tiny and random: a 2-layer XLM-RoBERTa tower and a Unigram tokenizer trained here
on a few sentences in six languages. Its transformers name is one the hub does not know, and the
hub is switched off: anything that asked the hub for a file would fail.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import open_clip
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from common import onnx_towers
from common.artifact import load_artifact
from common.config import validate
from common.export import export, probe_image
from common.hf_text import TEXT_CONFIG_DIR, HfTextFilesError, text_cfg_override
from common.model import normalize, short_text_length
from common.onnx_towers import OnnxTowers
from serve.app import create_app
from serve.settings import Settings
from tests.serve_support import make_index, make_shard, wait_until_loaded
from train.config import smoke
from train.trainer import Trainer

HF_NAME = "duet-test/xlm-roberta-tiny"  # on no hub: only the copies on disk can serve it
SENTENCES = [
    "a photo of a dog",
    "a red circle",
    "café crème",
    "un chat noir sur le toit",
    "犬の写真",
    "赤い丸と青い四角",
    "фотография собаки",
    "красный круг",
    "μια φωτογραφία ενός σκύλου",
    "κόκκινος κύκλος",
]
QUERIES = ["犬の写真", "красный круг", "κόκκινος κύκλος", "café crème"]
MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {
        "hf_model_name": HF_NAME,
        "hf_tokenizer_name": HF_NAME,
        "hf_proj_type": "mlp",
        "hf_pooler_type": "mean_pooler",
        "context_length": 24,
    },
}


def trained_tokenizer() -> Any:
    """An XLM-RoBERTa-style fast tokenizer (Unigram, Metaspace) trained on SENTENCES."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer
    from transformers import XLMRobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0-4
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token="<unk>")
    tokenizer.train_from_iterator(SENTENCES * 20, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return XLMRobertaTokenizer(tokenizer_object=tokenizer)


def write_hub_folder(folder: Path, fast: Any) -> None:
    """An open_clip hub-layout folder of the tiny model, its tower's config in hf_text_config/."""
    from transformers import XLMRobertaConfig

    folder.mkdir(parents=True)
    fast.save_pretrained(folder)
    tower = XLMRobertaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    tower.save_pretrained(folder / TEXT_CONFIG_DIR)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    torch.manual_seed(0)
    clip = open_clip.create_model(f"local-dir:{folder}", **text_cfg_override(MODEL_CFG, folder))
    save_file(dict(clip.state_dict()), str(folder / "open_clip_model.safetensors"))


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """The hub switched off for this module: a file asked of it fails at once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def fast() -> Any:
    return trained_tokenizer()


@pytest.fixture(scope="module")
def source(offline: None, fast: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("multilingual") / "xlm-tiny"
    write_hub_folder(folder, fast)
    return folder


@pytest.fixture(scope="module")
def artifact(source: Path) -> Path:
    """The exported artifact, the source folder moved away (nothing may still read it)."""
    out = source.parent / "artifact"
    summary = export(str(source), out)
    assert summary["max_abs_difference"] <= 1e-5
    shutil.move(source, source.parent / "gone")
    return out


def test_the_artifact_carries_the_towers_config_and_tokenizer(artifact: Path):
    assert (artifact / TEXT_CONFIG_DIR / "config.json").is_file()
    assert (artifact / "tokenizer.json").is_file()
    config = json.loads((artifact / "open_clip_config.json").read_text())["model_cfg"]
    assert config["text_cfg"]["hf_model_name"] == HF_NAME  # open_clip's own name is kept
    loaded = load_artifact(artifact)
    assert loaded.manifest["context_length"] == 24
    # plain open_clip, offline, as docs/operations.md says: hf_model_name -> the carried config
    text_cfg = dict(config["text_cfg"], hf_model_name=str(artifact / TEXT_CONFIG_DIR))
    text_cfg["hf_model_pretrained"] = False
    clip, _, transform = open_clip.create_model_and_transforms(
        f"local-dir:{artifact}", text_cfg=text_cfg
    )
    tokens = open_clip.get_tokenizer(f"local-dir:{artifact}")(QUERIES)
    torch.testing.assert_close(loaded.tokenize(QUERIES), tokens, atol=0, rtol=0)
    image = transform(probe_image())[None]
    with torch.no_grad():
        ours = (loaded.model.encode_text(tokens), loaded.model.encode_image(image))
        theirs = (clip.eval().encode_text(tokens), clip.encode_image(image))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, normalize(b), atol=1e-6, rtol=0)


def test_non_latin_text_tokenizes_as_the_tokenizer_does_and_stays_bounded(
    artifact: Path, fast: Any
):
    loaded = load_artifact(artifact)
    tokens = loaded.tokenize(QUERIES)
    for row, text in zip(tokens, QUERIES, strict=True):
        ids = fast(text)["input_ids"]
        assert row[: len(ids)].tolist() == ids and 3 not in ids  # no <unk>: really tokenized
    huge = "фотография собаки " * 60_000  # 1 MB: only the first max_chars are read
    torch.testing.assert_close(
        loaded.tokenize([huge]), loaded.tokenize([huge[: loaded.tokenize.max_chars]])
    )


def test_a_folder_without_the_towers_config_says_where_to_put_it(source: Path, artifact: Path):
    bare = artifact.parent / "bare"
    shutil.copytree(artifact.parent / "gone", bare)
    shutil.rmtree(bare / TEXT_CONFIG_DIR)
    with pytest.raises(HfTextFilesError, match=rf"{HF_NAME}.*{bare / TEXT_CONFIG_DIR}"):
        export(str(bare), artifact.parent / "never")
    assert not (artifact.parent / "never").exists()


@pytest.mark.slow
def test_fine_tuning_with_a_locked_image_tower_keeps_it_and_carries_the_text_files(
    artifact: Path, synth_dir: Path, tmp_path: Path
):
    """`model.name=local-dir:ARTIFACT`: the architecture and tokenizer of the artifact, offline;
    the run's own artifact is as self-contained as the one it started from."""
    cfg = smoke()
    cfg.run_dir, cfg.device, cfg.steps = str(tmp_path / "run"), "cpu", 2
    cfg.model.name, cfg.model.pretrained = f"local-dir:{artifact}", str(artifact)
    cfg.model.lock_image = True
    cfg.data.train_shards = f"{synth_dir}/train/shard-000000.tar"
    cfg.data.val_shards = cfg.data.zeroshot_file = ""
    cfg.data.batch_size_per_rank, cfg.data.shuffle_buffer = 8, 0
    cfg.logging.tensorboard = False
    validate(cfg)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    tuned_dir = tmp_path / "run" / "artifact"
    assert (tuned_dir / TEXT_CONFIG_DIR / "config.json").is_file()
    assert (tuned_dir / "tokenizer.json").is_file()
    base, tuned = load_artifact(artifact), load_artifact(tuned_dir)
    assert tuned.manifest["model_name"] == base.manifest["model_name"]
    base_state, tuned_state = base.model.clip.state_dict(), tuned.model.clip.state_dict()
    for key, value in base_state.items():
        if key.startswith("visual."):
            torch.testing.assert_close(tuned_state[key], value, atol=0, rtol=0)
    assert any(
        not torch.equal(tuned_state[k], v) for k, v in base_state.items() if k.startswith("text.")
    )
    torch.testing.assert_close(tuned.tokenize(QUERIES), base.tokenize(QUERIES), atol=0, rtol=0)


@pytest.mark.slow
def test_search_answers_non_latin_and_accented_queries(artifact: Path, tmp_path: Path):
    """An index built with the model, then /search in Japanese, Russian, Greek and French: each
    answer is the index's nearest items to the query as the model embeds it."""
    shard = make_shard(tmp_path / "data", samples=24)
    index = make_index(artifact, shard, tmp_path / "index")
    loaded = load_artifact(artifact)
    with torch.no_grad():
        queries = loaded.model.encode_text(loaded.tokenize(QUERIES))  # [Q, D]
    settings = Settings(artifact_dir=artifact, index_dir=index)
    with TestClient(create_app(settings)) as client:
        assert wait_until_loaded(client).status_code == 200
        for query, embedding in zip(QUERIES, queries, strict=True):
            by_text = client.post("/search", json={"text": query, "k": 5})
            by_vector = client.post("/search", json={"embedding": embedding.tolist(), "k": 5})
            assert by_text.status_code == 200, by_text.text
            found = [(r["id"], r["score"]) for r in by_text.json()["results"]]
            expected = [(r["id"], r["score"]) for r in by_vector.json()["results"]]
            assert len(found) == 5
            assert [i for i, _ in found] == [i for i, _ in expected]
            assert [s for _, s in found] == pytest.approx([s for _, s in expected], abs=1e-5)


@pytest.mark.slow
def test_onnx_runtime_runs_the_hugging_face_tower(artifact: Path, tmp_path: Path):
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    checks = onnx_towers.export_onnx(copy)["checks"]
    assert checks["fp32"]["max_abs_difference"] < 1e-4
    loaded, towers = load_artifact(copy), OnnxTowers.load(copy, "fp32")
    tokens = loaded.tokenize(QUERIES + SENTENCES)
    with torch.no_grad():
        expected = loaded.model.encode_text(tokens)
    torch.testing.assert_close(towers.encode_text(tokens), expected, atol=1e-5, rtol=0)


def test_short_queries_run_at_their_real_length_with_the_same_embeddings(artifact: Path):
    """The padding of a Hugging Face tower is masked out: a batch of short texts is cut to the
    length of its longest, and embeds as at the full context."""
    loaded = load_artifact(artifact)
    tokens = loaded.tokenize(["犬", *QUERIES])  # [5, 24]
    longest = int(tokens.ne(loaded.tokenize.inner.tokenizer.pad_token_id).sum(-1).max())
    assert longest < 24  # the batch is short, below the context
    assert short_text_length(loaded.model.clip, tokens) == longest
    first = int(tokens[0].ne(loaded.tokenize.inner.tokenizer.pad_token_id).sum())
    assert short_text_length(loaded.model.clip, tokens[:1]) == max(first, 2)
    with torch.no_grad():
        full = normalize(loaded.model.clip.encode_text(tokens))
        for rows in (slice(0, 1), slice(0, 5)):
            cut = loaded.model.encode_text(tokens[rows])
            torch.testing.assert_close(cut, full[rows], atol=1e-6, rtol=0)
