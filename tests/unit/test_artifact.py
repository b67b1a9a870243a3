"""The artifact loads in open_clip itself with identical embeddings; bad inputs fail clearly."""

import io

import open_clip
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from common.artifact import WEIGHTS_FILE, load_artifact, read_manifest, write_artifact
from common.model import build_model
from common.preprocess import ImageTooLargeError, InvalidImageError, load_image, tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(7)
    model = build_model("duet-micro").eval()
    out = write_artifact(model, tmp_path_factory.mktemp("a") / "artifact", provenance={"step": 3})
    return model, out


def images_and_texts():
    pil = [Image.new("RGB", (50, 40), c) for c in [(255, 0, 0), (0, 0, 255), (20, 200, 30)]]
    return pil, ["a red circle", "a blue square", "green star, small"]


def test_open_clip_loads_the_artifact_with_identical_embeddings(exported):
    model, out = exported
    pil, texts = images_and_texts()
    ours = load_artifact(out)
    ours_img = ours.model.encode_image(torch.stack([ours.transform(p) for p in pil]))
    ours_txt = ours.model.encode_text(ours.tokenize(texts))

    # the contract: register the config, then open_clip's own loader with pretrained=<file>
    open_clip.add_model_config(out / "model_configs" / "duet-micro.json")
    clip, _, preprocess = open_clip.create_model_and_transforms(
        "duet-micro", pretrained=str(out / WEIGHTS_FILE)
    )
    clip.eval()
    tok = open_clip.get_tokenizer("duet-micro")
    with torch.no_grad():
        oc_img = clip.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        oc_txt = clip.encode_text(tok(texts), normalize=True)
        original = model.encode_image(torch.stack([ours.transform(p) for p in pil]))
    assert_close(ours_img, oc_img)
    assert_close(ours_txt, oc_txt)
    assert_close(ours_img, original)  # and the exported weights are the trained model's
    assert_close(ours_img.norm(dim=-1), torch.ones(3))
    assert_close(clip.logit_scale, model.logit_scale)


def test_local_dir_loading_and_manifest(exported):
    _, out = exported
    clip = open_clip.create_model(f"local-dir:{out}")
    assert isinstance(clip, open_clip.CLIP)
    assert out.stat().st_mode & 0o777 == 0o755  # readable by a service running as another user
    manifest = read_manifest(out)
    assert manifest["model_name"] == "duet-micro" and manifest["embed_dim"] == 64
    assert manifest["provenance"] == {"step": 3}


def test_not_an_artifact_and_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a model artifact"):
        load_artifact(tmp_path)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model("duet-micro", pretrained=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        build_model("no-such-model")


def test_tokenizer_respects_context_length():
    assert tokenizer("duet-micro")(["a " * 100]).shape == (1, 20)


def test_load_image_rejects_garbage_and_oversized_images():
    with pytest.raises(InvalidImageError, match="not a decodable image"):
        load_image(b"definitely not an image")
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(b"")
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    with pytest.raises(ImageTooLargeError, match="300x200"):
        load_image(buf.getvalue(), max_pixels=10_000)
    assert load_image(buf.getvalue()).size == (300, 200)


def test_a_model_with_a_learned_bias_round_trips(tmp_path):
    model = build_model("duet-micro", init_logit_bias=-10.0)
    with torch.no_grad():
        model.clip.logit_bias.fill_(-7.5)
    loaded = load_artifact(write_artifact(model, tmp_path / "siglip", provenance={}))
    assert_close(loaded.model.clip.logit_bias, model.clip.logit_bias)
    assert_close(loaded.model.logit_scale, model.logit_scale)
