"""Short texts are encoded at their real length, with the padded encode's embeddings."""

from __future__ import annotations

import pytest
import torch

from common.model import (
    BUNDLED_MODELS,
    TEXT_LENGTH_BUCKETS,
    build_model,
    normalize,
    short_text_length,
)
from common.preprocess import tokenizer

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
    assert length is not None and length in TEXT_LENGTH_BUCKETS and length < tokens.shape[1]
    with torch.no_grad():
        padded = normalize(model.clip.encode_text(tokens))  # open_clip's own, all positions
        for rows in (slice(0, 1), slice(0, 2), slice(0, 3)):  # mixed lengths; the last may be full
            torch.testing.assert_close(
                model.encode_text(tokens[rows]), padded[rows], atol=1e-5, rtol=0
            )


def test_long_texts_training_and_two_way_towers_run_at_full_length():
    torch.manual_seed(0)
    model = build_model("ViT-B-32").eval()
    long_text = " ".join(["red"] * 70)  # 72 tokens: past the largest bucket
    tokens = tokenizer("ViT-B-32")([long_text, "dog"])
    assert short_text_length(model.clip, tokens) is None
    short = tokenizer("ViT-B-32")(["dog"])
    assert short_text_length(model.clip, short) == 8
    model.clip.attn_mask = None  # a text tower without the causal mask attends to the padding
    assert short_text_length(model.clip, short) is None


def test_training_keeps_the_padded_forward(monkeypatch):
    """Training runs open_clip's own forward (its gradients and numerics are the reference)."""
    model = build_model("duet-micro").train()
    calls = []
    original = model.clip.encode_text
    monkeypatch.setattr(model.clip, "encode_text", lambda t: calls.append(t.shape) or original(t))
    model.encode_text(tokenizer("duet-micro")(["dog"]))
    model.eval()
    model.encode_text(tokenizer("duet-micro")(["dog"]))
    assert calls == [torch.Size([1, 20])]  # only the training call went through open_clip's
