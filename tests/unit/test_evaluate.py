"""Retrieval, zero-shot and hard-negative metrics as pure functions over hand-built matrices,
evaluate() on compositional data against a one-sample-at-a-time reference, and the CLI."""

import io
import itertools
import json
import tarfile

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.artifact import load_artifact, write_artifact
from common.model import build_model
from train.evaluate import (
    evaluate,
    hard_negative_accuracy,
    load_zeroshot,
    main,
    recall_at_k,
    retrieval_metrics,
    topk_accuracy,
    zeroshot_class_weights,
    zeroshot_metrics,
)
from train.synth import generate


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


def test_k_larger_than_the_candidates_is_always_a_hit():
    sim = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # both matches rank last
    assert recall_at_k(sim, 1) == 0.0
    assert recall_at_k(sim, 2) == 1.0
    assert recall_at_k(sim, 50) == 1.0
    assert topk_accuracy(sim, torch.tensor([0, 1]), 50) == 1.0


def test_ties_are_shared_not_counted_as_hits():
    # a collapsed model: every score equal; the match is at a uniformly random place of 4
    flat = torch.zeros(4, 4)
    assert recall_at_k(flat, 1) == pytest.approx(1 / 4)
    assert recall_at_k(flat, 2) == pytest.approx(2 / 4)
    assert recall_at_k(flat, 4) == pytest.approx(1.0)
    # row 0: one column higher, match tied with two others -> places 1..3 equally likely
    sim = torch.tensor(
        [
            [0.5, 0.9, 0.5, 0.5],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    assert recall_at_k(sim, 1) == pytest.approx(3 / 4)  # row 0 misses
    assert recall_at_k(sim, 2) == pytest.approx((1 / 3 + 3) / 4)
    assert recall_at_k(sim, 3) == pytest.approx((2 / 3 + 3) / 4)
    assert recall_at_k(sim, 4) == pytest.approx(1.0)


def test_retrieval_metrics_both_directions():
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # texts 1 and 2 swapped
    m = retrieval_metrics(images, texts, ks=(1, 2, 3))
    assert m["text_to_image_recall@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_recall@1"] == pytest.approx(1 / 3)
    # text 1 scores image 2 higher and ties images 0 and 1 at 0: a hit at k=2 half the time
    assert m["text_to_image_recall@2"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["text_to_image_recall@3"] == pytest.approx(1.0)


def test_retrieval_directions_differ_when_the_matrix_is_not_symmetric():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both images identical
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = retrieval_metrics(images, texts, ks=(1,))
    # text 0 ties between the two images (0.5); text 1 scores both images 0 (0.5)
    assert m["text_to_image_recall@1"] == pytest.approx(0.5)
    # image 0 prefers text 0 (hit); image 1 also prefers text 0 (miss)
    assert m["image_to_text_recall@1"] == pytest.approx(0.5)


def reference_recall(similarity: torch.Tensor, k: int) -> float:
    """Average over every column order of a stable descending sort: random tie-breaking, exactly."""
    n, m = similarity.shape
    total = 0.0
    orders = list(itertools.permutations(range(m)))
    for order in orders:
        perm = torch.tensor(order)
        ranking = torch.argsort(similarity[:, perm], dim=1, descending=True, stable=True)
        place = (perm[ranking] == torch.arange(n)[:, None]).float().argmax(dim=1)
        total += (place < k).float().mean().item()
    return total / len(orders)


def test_tie_sharing_equals_averaging_over_every_tie_break():
    g = torch.Generator().manual_seed(1)
    sim = torch.randint(0, 3, (5, 5), generator=g).float()  # many ties
    for k in (1, 2, 3, 5):
        assert recall_at_k(sim, k) == pytest.approx(reference_recall(sim, k))


def test_chunked_equals_unchunked_on_random_data():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(203, 16, generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(203, 16, generator=g), dim=-1)
    ks = (1, 5, 10, 500)
    whole = retrieval_metrics(images, texts, ks, chunk_rows=203)
    for chunk_rows in (1, 7, 64, 1000):
        chunked = retrieval_metrics(images, texts, ks, chunk_rows=chunk_rows)
        assert chunked == pytest.approx(whole, abs=1e-12)
    # and both equal a plain argsort ranking over the full matrix (no ties in random floats)
    sim = texts @ images.T
    place = (torch.argsort(sim, dim=1, descending=True) == torch.arange(203)[:, None]).int()
    place = place.argmax(dim=1)
    for k in ks:
        assert whole[f"text_to_image_recall@{k}"] == pytest.approx((place < k).float().mean())
    assert 0.0 < whole["text_to_image_recall@1"] < whole["text_to_image_recall@10"] < 1.0


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 10) == pytest.approx(1.0)


def test_zeroshot_top1_and_top5_on_hand_built_classes():
    classes = torch.eye(8)  # class c's prototype is basis vector c
    # image i: its true class ranks (0-based) 0, 3, 4, 5 and 7 (the scores of the other classes
    # are set so exactly that many classes score higher)
    ranks = [0, 3, 4, 5, 7]
    images, labels = [], []
    for i, rank in enumerate(ranks):
        label = i
        scores = torch.linspace(1.0, 0.2, 8)  # descending, distinct
        others = [c for c in range(8) if c != label]
        row = torch.empty(8)
        row[label] = scores[rank]
        rest = [s for j, s in enumerate(scores) if j != rank]
        row[others] = torch.stack(rest)
        images.append(row)
        labels.append(label)
    m = zeroshot_metrics(torch.stack(images), torch.tensor(labels), classes, chunk_rows=2)
    assert m["zeroshot_top1"] == pytest.approx(1 / 5)
    assert m["zeroshot_top5"] == pytest.approx(3 / 5)  # ranks 0, 3, 4
    assert m["zeroshot_chance"] == pytest.approx(1 / 8)


def test_zeroshot_labels_must_name_a_class():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        zeroshot_metrics(torch.eye(3), torch.tensor([0, 1, 3]), torch.eye(3))


def test_non_finite_features_fail_loudly():
    images = torch.eye(3)
    texts = torch.eye(3)
    texts[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(images, texts, ks=(1,))


def test_zeroshot_file_is_validated(tmp_path):
    path = tmp_path / "z.json"
    path.write_text('{"classnames": ["a"], "templates": ["no placeholder"]}')
    with pytest.raises(ValueError, match="templates"):
        load_zeroshot(path)
    path.write_text('{"classnames": ["a", "b"], "templates": ["a {}."]}')
    assert load_zeroshot(path) == (["a", "b"], ["a {}."])


@pytest.fixture(scope="module")
def micro_artifact(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("artifact")
    write_artifact(build_model("duet-micro"), out, provenance={"test": True})
    return out


def test_cli_evaluates_an_artifact_on_val_shards(micro_artifact, synth_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    metrics = main(
        [
            "--model",
            str(micro_artifact),
            "--data",
            f"{synth_dir}/val/shard-{{000000..000001}}.tar",
            "--zeroshot",
            str(synth_dir / "zeroshot.json"),
            "--recall-at",
            "1,5",
            "--chunk-rows",
            "100",
            "--out",
            str(out),
        ]
    )
    assert json.loads(capsys.readouterr().out) == metrics == json.loads(out.read_text())
    assert metrics["samples"] == 500 and metrics["zeroshot_samples"] == 500
    assert metrics["zeroshot_chance"] == pytest.approx(1 / 30)
    for name in ("text_to_image", "image_to_text"):
        assert 0 <= metrics[f"{name}_recall@1"] <= metrics[f"{name}_recall@5"] <= 1
    assert 0 <= metrics["zeroshot_top1"] <= metrics["zeroshot_top5"] <= 1
    assert "text_to_image_recall@10" not in metrics


def test_cli_bad_input_is_a_one_line_error(micro_artifact, synth_dir, tmp_path, capsys):
    val = f"{synth_dir}/val/shard-000000.tar"
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path), "--data", val])
    assert exc.value.code == 2
    assert "not a model artifact" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(micro_artifact), "--data", f"{tmp_path}/missing.tar"])
    assert exc.value.code == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(micro_artifact), "--data", val, "--recall-at", "0,5"])
    assert exc.value.code == 2


def test_hard_negative_accuracy_on_hand_built_features():
    images = torch.eye(5)
    true = torch.tensor(
        [
            [1.0, 0, 0, 0, 0],  # 1.0 vs 0.5: hit
            [0, 1.0, 0, 0, 0],  # 1.0 vs 2.0: miss
            [0, 0, 0.5, 0, 0],  # 0.5 vs 0.5: tie, half a hit
            [0, 0, 0, 0, 0],  # 0 vs 0: tie
            [0, 0, 0, 0, 0.3],  # 0.3 vs -1.0: hit
        ]
    )
    negative = torch.tensor(
        [
            [0.5, 0, 0, 0, 0],
            [0, 2.0, 0, 0, 0],
            [0, 0, 0.5, 0, 0],
            [1.0, 0, 0, 0, 0],
            [0, 0, 0, 0, -1.0],
        ]
    )
    assert hard_negative_accuracy(images, true, negative) == pytest.approx(3 / 5)
    # a collapsed model (every caption the same embedding) scores chance, not 1.0
    same = torch.ones(4, 3)
    assert hard_negative_accuracy(same, same, same) == pytest.approx(0.5)


def test_hard_negative_accuracy_rejects_bad_features():
    features = torch.eye(3)
    with pytest.raises(ValueError, match="shapes"):
        hard_negative_accuracy(features, features, torch.eye(2))
    with pytest.raises(ValueError, match="non-empty"):
        hard_negative_accuracy(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3))
    broken = features.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hard_negative_accuracy(features, features, broken)


@pytest.fixture(scope="module")
def compositional_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compositional")
    generate(
        out,
        train_shards=1,
        samples_per_shard=40,
        seed=0,
        val_samples=40,
        image_size=32,
        kind="compositional",
    )
    return out


def _val_samples(dataset):
    with tarfile.open(dataset / "val" / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return [
        (
            Image.open(io.BytesIO(members[name])).convert("RGB"),
            json.loads(members[name[:-3] + "json"]),
        )
        for name in sorted(members)
        if name.endswith(".jpg")
    ]


def _bounds(margins):
    """The (lowest, highest) hit rate a score margin per row allows: a margin within float noise of
    zero may fall either way once the same rows are embedded in other batches."""
    noise = 1e-5
    hits = sum(1 for m in margins if m > noise)
    near_ties = sum(1 for m in margins if abs(m) <= noise)
    return hits / len(margins), (hits + near_ties) / len(margins)


@torch.no_grad()
def test_evaluate_scores_hard_negatives_and_held_out_zeroshot(micro_artifact, compositional_dir):
    loaded = load_artifact(micro_artifact)
    model, transform, tokenize = loaded.model, loaded.transform, loaded.tokenize
    zeroshot_file = compositional_dir / "zeroshot.json"
    spec = f"{compositional_dir}/val/shard-000000.tar"
    metrics = evaluate(
        model, transform, tokenize, spec, zeroshot_file=str(zeroshot_file), ks=(1, 5), batch_size=7
    )
    # the reference: every sample embedded on its own, its negatives one at a time
    weights = zeroshot_class_weights(model, tokenize, *load_zeroshot(zeroshot_file))
    margins = {"swap_attribute": [], "swap_object": [], "replace_relation": []}
    held_out_margins = []
    samples = [(transform(image), meta) for image, meta in _val_samples(compositional_dir)]
    # the blind control: one image, the mean of all, against every sample's captions
    blind = model.encode_image(torch.stack([pixels for pixels, _ in samples]).mean(0)[None])[0]
    blind_margins: dict[str, list[float]] = {kind: [] for kind in margins}
    unseen_margins: dict[str, list[float]] = {kind: [] for kind in margins}
    for pixels, meta in samples:
        image_features = model.encode_image(pixels[None])[0]
        true_text = model.encode_text(tokenize([meta["caption"]]))[0]
        for kind, caption in meta["hard_negatives"].items():
            negative = model.encode_text(tokenize([caption]))[0]
            blind_margins[kind].append(float(blind @ true_text - blind @ negative))
        true = image_features @ model.encode_text(tokenize([meta["caption"]]))[0]
        for kind, caption in meta["hard_negatives"].items():
            margin = float(true - image_features @ model.encode_text(tokenize([caption]))[0])
            margins[kind].append(margin)
            if meta["held_out"]:
                unseen_margins[kind].append(margin)
        if meta["held_out"]:
            scores = weights @ image_features
            others = torch.cat([scores[: meta["label"]], scores[meta["label"] + 1 :]])
            held_out_margins.append(float(scores[meta["label"]] - others.max()))
    for kind, kind_margins in margins.items():
        low, high = _bounds(kind_margins)
        assert low <= metrics[f"compositional_{kind}"] <= high, kind
        low, high = _bounds(blind_margins[kind])
        assert low <= metrics[f"compositional_blind_{kind}"] <= high, kind
        low, high = _bounds(unseen_margins[kind])  # the held-out scenes' alone
        assert low <= metrics[f"compositional_held_out_{kind}"] <= high, kind
    low, high = _bounds(held_out_margins)
    assert low <= metrics["zeroshot_top1_held_out"] <= high
    assert metrics["zeroshot_held_out_samples"] == len(held_out_margins) > 0
    assert metrics["compositional_samples"] == metrics["samples"] == 40
    assert 0 <= metrics["zeroshot_top1"] <= metrics["zeroshot_top5"] <= 1


def test_data_without_hard_negatives_adds_no_compositional_figures(micro_artifact, tmp_path):
    generate(tmp_path, train_shards=1, samples_per_shard=12, seed=0, val_samples=12, image_size=32)
    loaded = load_artifact(micro_artifact)
    spec, zeroshot_file = f"{tmp_path}/val/shard-000000.tar", str(tmp_path / "zeroshot.json")
    metrics = evaluate(
        loaded.model, loaded.transform, loaded.tokenize, spec, zeroshot_file=zeroshot_file
    )
    assert metrics["zeroshot_samples"] == 12
    assert not [name for name in metrics if "compositional" in name or "held_out" in name]
