"""Zero-shot accuracy, image<->text recall@k and hard-negative accuracy: pure functions, plus a
runner over held-out shards.

The trainer calls `evaluate` every `eval.every_steps` and at the end; the same runs for any
artifact with

    python -m train.evaluate --model ARTIFACT --data SHARDS [--zeroshot FILE] [--out FILE]

Scores are computed a block of `chunk_rows` queries at a time (memory O(chunk_rows x N), never
the N x N matrix), and ties are shared: a true match tied with t other candidates counts as the
expected hit under random tie-breaking, so a collapsed model scores chance, not 1.0.

Samples whose JSON carries "hard_negatives" ({kind: caption}, as `train.synth --kind
compositional` writes) are also scored against those captions: `compositional_<kind>` is the
fraction whose image scores its true caption above the negative, and `compositional_blind_<kind>`
the same with every image replaced by one constant image, the mean of the held-out images: a
control that needs no image at all, so a score well above 0.5 there says the negatives can be
told apart by their wording alone (NegCLIP's warning). Samples marked "held_out": true
(a combination never seen in training) get their own zero-shot figure, `zeroshot_top1_held_out`,
and their own hard-negative accuracies, `compositional_held_out_<kind>`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.model import DualEncoder, class_embeddings
from common.preprocess import (
    DEFAULT_MAX_RESIZED_PIXELS,
    ResizeLimit,
    Tokenizer,
    Transform,
    decode_or_skip,
    preprocess_config,
)
from common.shards import iter_shards

log = logging.getLogger(__name__)


def match_ranks(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of [c, M] scores and each row's true column: (#columns scoring higher, #ties).

    Ties count the other columns scoring exactly as the true one; they matter for collapsed or
    quantised embeddings, where "higher only" would call every tie a hit.
    """
    positive = scores.gather(1, targets[:, None])  # [c, 1]
    higher = (scores > positive).sum(dim=1)
    ties = (scores == positive).sum(dim=1) - 1
    return higher, ties


def hit_rate(higher: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the chance that the true column is among the top k when ties are broken at random.

    The true column sits at rank higher + U, U uniform over the ties + 1 tied places, so it is a
    hit for clamp(k - higher, 0, ties + 1) of them. Without ties this is 1 if higher < k else 0.
    """
    places = (ties + 1).to(torch.float64)
    return (k - higher).clamp(min=0).to(torch.float64).minimum(places) / places


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows of [N, C] logits whose true label is among the k highest (ties shared)."""
    higher, ties = match_ranks(logits, labels)
    return hit_rate(higher, ties, k).mean().item()


def recall_at_k(similarity: torch.Tensor, k: int, chunk_rows: int = 4096) -> float:
    """Row i's match is column i: fraction of rows whose match ranks in the top k (ties shared)."""
    n = similarity.shape[0]
    hits = 0.0
    for start in range(0, n, chunk_rows):
        block = similarity[start : start + chunk_rows]  # [c, N]
        rows = torch.arange(start, start + block.shape[0], device=block.device)
        hits += hit_rate(*match_ranks(block, rows), k).sum().item()
    return hits / n


def _chunked_hit_rates(
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    ks: Sequence[int],
    chunk_rows: int,
) -> list[float]:
    """Mean hit rate at each k of queries [N, D] against keys [M, D], chunk_rows at a time.

    Only a [chunk_rows, M] block of scores exists at once, so a large held-out set costs
    O(chunk_rows x M) memory instead of O(N x M).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if not (torch.isfinite(queries).all() and torch.isfinite(keys).all()):
        raise ValueError("features contain NaN or infinity: the model diverged")
    hits = torch.zeros(len(ks), dtype=torch.float64)
    for start in range(0, queries.shape[0], chunk_rows):
        block = queries[start : start + chunk_rows] @ keys.T  # [c, M]
        higher, ties = match_ranks(block, targets[start : start + chunk_rows])
        for i, k in enumerate(ks):
            hits[i] += hit_rate(higher, ties, k).sum()
    return (hits / queries.shape[0]).tolist()


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int],
    *,
    chunk_rows: int = 1024,
) -> dict[str, float]:
    """text->image and image->text recall@k for paired unit vectors [N, D] x [N, D]."""
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"paired features differ in shape: {tuple(image_features.shape)} images, "
            f"{tuple(text_features.shape)} texts"
        )
    pairs = torch.arange(image_features.shape[0])
    metrics = {}
    for name, queries, keys in (
        ("text_to_image", text_features, image_features),
        ("image_to_text", image_features, text_features),
    ):
        for k, rate in zip(
            ks, _chunked_hit_rates(queries, keys, pairs, ks, chunk_rows), strict=True
        ):
            metrics[f"{name}_recall@{k}"] = rate
    return metrics


def zeroshot_metrics(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5),
    chunk_rows: int = 1024,
) -> dict[str, float]:
    """Zero-shot top-k accuracy of images [N, D] with labels [N] against class weights [C, D]."""
    num_classes = class_weights.shape[0]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} class names, "
            f"found {int(labels.min())}..{int(labels.max())}"
        )
    rates = _chunked_hit_rates(image_features, class_weights, labels, ks, chunk_rows)
    metrics = {f"zeroshot_top{k}": rate for k, rate in zip(ks, rates, strict=True)}
    metrics["zeroshot_chance"] = 1.0 / num_classes
    return metrics


def hard_negative_accuracy(
    image_features: torch.Tensor,
    true_text_features: torch.Tensor,
    negative_text_features: torch.Tensor,
) -> float:
    """Fraction of images [M, D] that score their true caption [M, D] above their negative [M, D].

    A tie counts half, the expected hit of a random choice between the two, as ties count
    everywhere in this module: a collapsed model scores 0.5, not 1.0.
    """
    shapes = {tuple(t.shape) for t in (image_features, true_text_features, negative_text_features)}
    if len(shapes) != 1 or image_features.ndim != 2 or not image_features.shape[0]:
        raise ValueError(f"need three non-empty [M, D] feature tensors alike, got shapes {shapes}")
    features = (image_features, true_text_features, negative_text_features)
    if not all(torch.isfinite(t).all() for t in features):
        raise ValueError("features contain NaN or infinity: the model diverged")
    true = (image_features * true_text_features).sum(dim=1)  # [M]
    negative = (image_features * negative_text_features).sum(dim=1)  # [M]
    hits = (true > negative).to(torch.float64) + 0.5 * (true == negative).to(torch.float64)
    return hits.mean().item()


@dataclass(slots=True)
class HardNegatives:
    """One kind of hard-negative caption, embedded, for the samples that have one."""

    rows: torch.Tensor  # [M] the samples' rows in HeldOut
    text_features: torch.Tensor  # [M, D]


@dataclass(slots=True)
class HeldOut:
    """Embedded held-out samples: paired features, class labels (-1 when unknown), skips, and
    for compositional data which samples hold unseen combinations and their hard negatives."""

    image_features: torch.Tensor  # [N, D]
    text_features: torch.Tensor  # [N, D]
    labels: torch.Tensor  # [N]
    skipped: Counter[str]
    held_out: torch.Tensor  # [N] bool: the sample's JSON says "held_out": true
    negatives: dict[str, HardNegatives]  # by kind; empty when no sample has hard negatives
    blind_image_features: torch.Tensor | None = None
    """[D] the features of the mean image (the blind control); None without hard negatives."""


@dataclass(slots=True)
class _Pending:
    """One decoded sample waiting for its batch's forward pass."""

    image: torch.Tensor  # [3, H, W]
    caption: str
    label: int
    held_out: bool
    negatives: dict[str, str]  # kind -> caption


def _sample_fields(meta: Mapping[str, Any], key: str) -> tuple[int, bool, dict[str, str]]:
    """(label, held_out, hard negatives) from a sample's JSON; a malformed field is an error."""
    held_out, negatives = meta.get("held_out", False), meta.get("hard_negatives", {})
    if not isinstance(held_out, bool):
        raise ValueError(f"sample {key}: 'held_out' must be true or false, got {held_out!r}")
    if not isinstance(negatives, dict) or not all(
        isinstance(c, str) and c.strip() for c in negatives.values()
    ):
        raise ValueError(
            f"sample {key}: 'hard_negatives' must map kinds to captions, got {negatives!r}"
        )
    return int(meta.get("label", -1)), held_out, negatives


@torch.no_grad()
def embed_shards(
    model: DualEncoder,
    transform: Transform,
    tokenize: Tokenizer,
    spec: str,
    *,
    batch_size: int = 256,
    max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS,
) -> HeldOut:
    """Embed every usable sample of `spec`, in order, in batches of `batch_size`; images over
    the service's bounds (`max_resized_pixels` after the model's resize) are skipped, counted.

    A batch's hard-negative captions (at most a few per sample) share one extra text forward.
    """
    device = next(model.parameters()).device
    resize = ResizeLimit(preprocess_config(model.clip), max_resized_pixels)
    skipped: Counter[str] = Counter()
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    labels: list[int] = []
    held_out: list[bool] = []
    negative_rows: defaultdict[str, list[int]] = defaultdict(list)
    negative_texts: defaultdict[str, list[torch.Tensor]] = defaultdict(list)
    batch: list[_Pending] = []
    pixel_sum: list[torch.Tensor] = []  # [1, 3, H, W] running sum of the transformed images

    def encode_text(captions: list[str]) -> torch.Tensor:
        return model.encode_text(tokenize(captions).to(device)).cpu()

    def flush() -> None:
        first_row = len(labels)
        pixels = torch.stack([b.image for b in batch])
        pixel_sum[:] = [pixels.sum(0, keepdim=True) + (pixel_sum[0] if pixel_sum else 0)]
        images.append(model.encode_image(pixels.to(device)).cpu())
        texts.append(encode_text([b.caption for b in batch]))
        labels.extend(b.label for b in batch)
        held_out.extend(b.held_out for b in batch)
        negatives = [
            (kind, first_row + i, caption)
            for i, b in enumerate(batch)
            for kind, caption in b.negatives.items()
        ]
        if negatives:
            features = encode_text([caption for _, _, caption in negatives])  # [K, D]
            for (kind, row, _), feature in zip(negatives, features, strict=True):
                negative_rows[kind].append(row)
                negative_texts[kind].append(feature)
        batch.clear()

    for sample in iter_shards(spec, skipped):
        decoded = decode_or_skip(sample.image, skipped, key=sample.key, resize=resize)
        if decoded is None:
            continue
        fields = _sample_fields(sample.meta, sample.key)
        batch.append(_Pending(transform(decoded), sample.caption, *fields))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not images:
        raise ValueError(f"no usable samples in {spec!r} (skipped: {dict(skipped)})")
    negatives = {
        kind: HardNegatives(torch.tensor(rows), torch.stack(negative_texts[kind]))
        for kind, rows in sorted(negative_rows.items())
    }
    blind = None
    if negatives:  # the blind control's one image: the mean of those seen
        blind = model.encode_image((pixel_sum[0] / len(labels)).to(device)).cpu()[0]
    return HeldOut(
        image_features=torch.cat(images),
        text_features=torch.cat(texts),
        labels=torch.tensor(labels),
        skipped=skipped,
        held_out=torch.tensor(held_out, dtype=torch.bool),
        negatives=negatives,
        blind_image_features=blind,
    )


def compositional_metrics(held: HeldOut) -> dict[str, float]:
    """`compositional_<kind>`: hard-negative accuracy per kind, over the samples that have that
    kind; `compositional_held_out_<kind>`: the same over those marked held-out (a combination
    never seen in training), where any are; `compositional_blind_<kind>`: the same with the
    mean image in place of each image; `compositional_samples`: how many samples have any.
    Empty when none has negatives."""
    if not held.negatives:
        return {}
    metrics = {}
    for kind, negatives in held.negatives.items():
        images = held.image_features[negatives.rows]
        true_texts = held.text_features[negatives.rows]
        metrics[f"compositional_{kind}"] = hard_negative_accuracy(
            images, true_texts, negatives.text_features
        )
        unseen = held.held_out[negatives.rows]  # [M] bool
        if bool(unseen.any()):
            metrics[f"compositional_held_out_{kind}"] = hard_negative_accuracy(
                images[unseen], true_texts[unseen], negatives.text_features[unseen]
            )
        if held.blind_image_features is not None:
            blind = held.blind_image_features.expand_as(images)
            metrics[f"compositional_blind_{kind}"] = hard_negative_accuracy(
                blind, true_texts, negatives.text_features
            )
    rows = torch.cat([negatives.rows for negatives in held.negatives.values()])
    metrics["compositional_samples"] = float(rows.unique().numel())
    return metrics


def load_zeroshot(path: str | Path) -> tuple[list[str], list[str]]:
    """(classnames, templates) from a JSON file {"classnames": [...], "templates": [...]}."""
    data = json.loads(Path(path).read_text())
    classnames, templates = data.get("classnames"), data.get("templates")
    if not classnames or not templates or not all("{}" in t for t in templates):
        raise ValueError(f"{path}: needs non-empty 'classnames' and 'templates' containing '{{}}'")
    return list(classnames), list(templates)


def zeroshot_class_weights(
    model: DualEncoder,
    tokenize: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Class prototypes [C, D], embedding at most ~batch_size prompts per forward pass.

    1,000 classes x 80 templates would otherwise be one forward pass of 80k prompts.
    """
    per_pass = max(1, batch_size // len(templates))
    return torch.cat(
        [
            class_embeddings(model, tokenize, classnames[i : i + per_pass], templates).cpu()
            for i in range(0, len(classnames), per_pass)
        ]
    )


def evaluate(
    model: DualEncoder,
    transform: Transform,
    tokenize: Tokenizer,
    spec: str,
    *,
    zeroshot_file: str = "",
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    chunk_rows: int = 1024,
    max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS,
) -> dict[str, float]:
    """Retrieval recall@k on `spec`, zero-shot top-1/top-5 if a zero-shot file is given, and the
    hard-negative accuracies if the samples' JSON carries hard negatives.

    The zero-shot file is read first, so that a bad one fails before the shards are embedded.
    """
    zeroshot = load_zeroshot(zeroshot_file) if zeroshot_file else None
    was_training = model.training
    model.eval()
    try:
        held = embed_shards(
            model,
            transform,
            tokenize,
            spec,
            batch_size=batch_size,
            max_resized_pixels=max_resized_pixels,
        )
        metrics: dict[str, float] = {
            "samples": float(len(held.labels)),
            "skipped_samples": float(sum(held.skipped.values())),
        }
        metrics.update(
            retrieval_metrics(held.image_features, held.text_features, ks, chunk_rows=chunk_rows)
        )
        if zeroshot is not None:
            known = held.labels >= 0
            if not bool(known.any()):
                raise ValueError(f"{spec!r}: no sample has a 'label' in its JSON for zero-shot")
            weights = zeroshot_class_weights(model, tokenize, *zeroshot, batch_size=batch_size)
            metrics.update(
                zeroshot_metrics(
                    held.image_features[known], held.labels[known], weights, chunk_rows=chunk_rows
                )
            )
            metrics["zeroshot_samples"] = float(known.sum())
            metrics.update(_held_out_zeroshot(held, known, weights, chunk_rows))
        metrics.update(compositional_metrics(held))
        return metrics
    finally:
        model.train(was_training)


def _held_out_zeroshot(
    held: HeldOut, known: torch.Tensor, weights: torch.Tensor, chunk_rows: int
) -> dict[str, float]:
    """Zero-shot top-1 over the samples marked held-out: combinations never seen in training, so
    this is the compositional-generalisation figure. Empty when no sample is marked."""
    unseen = known & held.held_out
    if not bool(unseen.any()):
        return {}
    top1 = zeroshot_metrics(
        held.image_features[unseen], held.labels[unseen], weights, ks=(1,), chunk_rows=chunk_rows
    )["zeroshot_top1"]
    return {"zeroshot_top1_held_out": top1, "zeroshot_held_out_samples": float(unseen.sum())}


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"every k must be >= 1, got {text!r}")
    return ks


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """CLI: the trainer's held-out evaluation for any artifact; prints (and saves) JSON."""
    from common.artifact import load_artifact

    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__)
    parser.add_argument("--model", required=True, help="model artifact directory")
    parser.add_argument("--data", required=True, help="held-out shards (brace ranges, '::')")
    parser.add_argument("--zeroshot", default="", help="classnames + templates JSON")
    parser.add_argument("--recall-at", type=_parse_ks, default=(1, 5, 10), help="k of recall@k")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per forward pass")
    parser.add_argument("--chunk-rows", type=int, default=1024, help="query rows per score block")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name, value in (("--batch-size", args.batch_size), ("--chunk-rows", args.chunk_rows)):
        if value < 1:
            parser.error(f"{name} must be >= 1")
    try:
        loaded = load_artifact(args.model, device=args.device)
        metrics = evaluate(
            loaded.model,
            loaded.transform,
            loaded.tokenize,
            args.data,
            zeroshot_file=args.zeroshot,
            ks=args.recall_at,
            batch_size=args.batch_size,
            chunk_rows=args.chunk_rows,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"python -m train.evaluate: error: {exc}", file=sys.stderr)
        sys.exit(2)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return metrics


if __name__ == "__main__":
    main()
