"""Short texts are encoded at their real length, with the padded encode's embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from common.artifact import load_artifact, write_artifact
from common.model import (
    BUNDLED_MODELS,
    build_model,
    cut_text_padding,
    normalize,
    short_text_length,
    text_pooling,
)
from common.preprocess import tokenizer
from serve.encoder import Encoder

TEXTS = [
    "dog",
    "a red circle",
    "a small red circle left of a large blue square in the top right corner",
]


@pytest.mark.parametrize("name", [*BUNDLED_MODELS, "ViT-B-32"])
def test_short_batches_give_the_padded_embeddings(name: str):
    torch.manual_seed(0)
    model = build_model(name).eval()
    tokens = tokenizer(name)(TEXTS)
    length = short_text_length(model.clip, tokens[:2])
    # the longest of the two texts' own length: its start, its words and its end-of-text
    assert length == int(tokens[:2].argmax(dim=-1).max()) + 1 < tokens.shape[1]
    with torch.no_grad():
        padded = normalize(model.clip.encode_text(tokens))  # open_clip's own, all positions
        for rows in (slice(0, 1), slice(0, 2), slice(0, 3)):  # mixed lengths; the last may be full
            torch.testing.assert_close(
                model.encode_text(tokens[rows]), padded[rows], atol=1e-5, rtol=0
            )


def test_full_texts_training_and_two_way_towers_run_at_full_length():
    torch.manual_seed(0)
    model = build_model("ViT-B-32").eval()
    long_text = " ".join(["red"] * 70)  # 72 tokens: past the largest bucket, at its own length
    tokens = tokenizer("ViT-B-32")([long_text, "dog"])
    assert short_text_length(model.clip, tokens) == 72
    cut_off = tokenizer("ViT-B-32")([" ".join(["red"] * 80)])  # fills the context
    assert short_text_length(model.clip, cut_off) is None
    short = tokenizer("ViT-B-32")(["dog"])
    assert short_text_length(model.clip, short) == 3  # start, "dog", end
    model.clip.attn_mask = None  # a text tower without the causal mask attends to the padding
    assert short_text_length(model.clip, short) is None


def test_training_runs_full_tokens_through_open_clip_and_cut_ones_at_their_length(monkeypatch):
    """Training does not cut by itself (the batches come cut, `cut_text_padding`): full-length
    tokens run open_clip's own forward, in training as the reference."""
    model = build_model("duet-micro").train()
    calls = []
    original = model.clip.encode_text
    monkeypatch.setattr(model.clip, "encode_text", lambda t: calls.append(t.shape) or original(t))
    model.encode_text(tokenizer("duet-micro")(["dog"]))
    model.encode_text(tokenizer("duet-micro")(["dog"])[:, :8])
    model.eval()
    model.encode_text(tokenizer("duet-micro")(["dog"]))
    assert calls == [torch.Size([1, 20])]  # only the full training call went through open_clip's


@pytest.mark.parametrize("name", ["duet-tiny", "ViT-B-32"])
def test_cut_training_batches_give_the_padded_embeddings_and_gradients(name: str):
    """What the trainer does to every batch: captions and hard negatives cut to one bucketed
    length; the loss's embeddings and every parameter's gradient are those of the padded batch."""
    torch.manual_seed(0)
    model = build_model(name).train()
    tokenize = tokenizer(name)
    captions = tokenize(["a red circle", "dog"])  # 5 and 3 positions
    negatives = tokenize(["a blue circle", "a red square"]).unflatten(0, (2, 1))
    pooling = text_pooling(model.clip)
    assert pooling is not None
    cut, cut_negatives = cut_text_padding(pooling, captions, negatives)
    assert cut.shape == (2, 8) and cut_negatives.shape == (2, 1, 8)  # the first bucket
    assert torch.equal(cut, captions[:, :8]) and torch.equal(cut_negatives, negatives[..., :8])

    def embeddings_and_grads(*token_sets: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        model.zero_grad(set_to_none=True)
        texts = model.encode_text(torch.cat([token_sets[0], token_sets[1].flatten(0, 1)]))
        (texts * torch.linspace(-1, 1, texts.numel()).view_as(texts)).sum().backward()
        return texts.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    padded, padded_grads = embeddings_and_grads(captions, negatives)
    got, grads = embeddings_and_grads(cut, cut_negatives)
    torch.testing.assert_close(got, padded, atol=1e-5, rtol=0)
    assert [g is None for g in grads] == [g is None for g in padded_grads]
    for grad, padded_grad in zip(grads, padded_grads, strict=True):
        if grad is not None:
            torch.testing.assert_close(grad, padded_grad, atol=1e-5, rtol=1e-4)


def test_a_batch_is_cut_to_its_longest_text_and_left_whole_when_that_fills_the_context():
    tokenize = tokenizer("ViT-B-32")
    pooling = text_pooling(build_model("duet-micro").clip)  # argmax: open_clip's CLIP
    assert pooling is not None
    short, longer = tokenize(["dog"]), tokenize([TEXTS[2]])  # 3 and 17 positions
    (cut,) = cut_text_padding(pooling, torch.cat([short, short]))
    assert cut.shape == (2, 8)
    # the longest row decides, a negative's included: 17 positions -> the bucket of 24
    assert [t.shape[-1] for t in cut_text_padding(pooling, short, longer[None])] == [24, 24]
    full = tokenize([" ".join(["red"] * 80)])  # fills the context: nothing to cut
    assert cut_text_padding(pooling, short, full)[0] is short
    assert [t.shape[-1] for t in cut_text_padding(pooling, short, short[:0])] == [8, 8]


class RecordingTowers:
    """The real model's towers, noting (rows, length run at) of every text batch they encode."""

    def __init__(self, model: Any) -> None:
        self.model, self.shapes = model, []

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        length = short_text_length(self.model.clip, tokens) or tokens.shape[1]
        self.shapes.append((tokens.shape[0], length))
        return self.model.encode_text(tokens)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


def test_a_mixed_batch_is_encoded_per_length_with_each_texts_own_embedding(tmp_path):
    """Long texts among short ones: the short rows run at 8 positions, not at the longest's
    (duet-tiny's context is 20)."""
    torch.manual_seed(0)
    loaded = load_artifact(write_artifact(build_model("duet-tiny"), tmp_path / "a", provenance={}))
    towers = RecordingTowers(loaded.model)
    encoder = Encoder(loaded, towers=towers)
    texts = ["dog", TEXTS[2], "a red circle", "cat", " ".join(["red"] * 40)]
    got = encoder.encode_texts(texts)  # [5, D]
    # the three short ones at the longest's length, 5 ("a red circle"); not all five at 20
    assert sorted(towers.shapes) == [(2, 20), (3, 5)]
    alone = np.concatenate([encoder.encode_texts([text]) for text in texts])
    np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)
