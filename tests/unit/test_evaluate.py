"""Retrieval and zero-shot metrics as pure functions over hand-built matrices."""

import pytest
import torch

from train.evaluate import load_zeroshot, recall_at_k, retrieval_metrics, topk_accuracy


def test_recall_at_k_on_a_hand_built_matrix():
    # row i's match is column i; its rank: row0 -> 0, row1 -> 2, row2 -> 1
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2],
            [0.8, 0.3, 0.7],
            [0.1, 0.9, 0.5],
        ]
    )
    assert recall_at_k(sim, 1) == pytest.approx(1 / 3)
    assert recall_at_k(sim, 2) == pytest.approx(2 / 3)
    assert recall_at_k(sim, 3) == pytest.approx(1.0)
    assert recall_at_k(sim, 2, chunk_rows=1) == pytest.approx(2 / 3)  # chunking changes nothing


def test_retrieval_metrics_both_directions():
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # texts 1 and 2 swapped
    m = retrieval_metrics(images, texts, ks=(1, 2))
    assert m["text_to_image_recall@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_recall@1"] == pytest.approx(1 / 3)
    assert m["text_to_image_recall@2"] == pytest.approx(1.0)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 10) == pytest.approx(1.0)


def test_zeroshot_file_is_validated(tmp_path):
    path = tmp_path / "z.json"
    path.write_text('{"classnames": ["a"], "templates": ["no placeholder"]}')
    with pytest.raises(ValueError, match="templates"):
        load_zeroshot(path)
    path.write_text('{"classnames": ["a", "b"], "templates": ["a {}."]}')
    assert load_zeroshot(path) == (["a", "b"], ["a {}."])
