"""Zero-shot accuracy and image<->text recall@k: pure functions, plus a runner over held-out shards.

The trainer calls `evaluate` every `eval.every_steps` and at the end; the same runs for any
artifact with

    python -m train.evaluate --model ARTIFACT --data SHARDS [--zeroshot FILE] [--out FILE]

Scores are computed a block of `chunk_rows` queries at a time (memory O(chunk_rows x N), never
the N x N matrix), and ties are shared: a true match tied with t other candidates counts as the
expected hit under random tie-breaking, so a collapsed model scores chance, not 1.0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common.model import DualEncoder, class_embeddings
from common.preprocess import Tokenizer, Transform, decode_or_skip
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


@dataclass(slots=True)
class HeldOut:
    """Embedded held-out samples: paired features, class labels (-1 when unknown), skips."""

    image_features: torch.Tensor  # [N, D]
    text_features: torch.Tensor  # [N, D]
    labels: torch.Tensor  # [N]
    skipped: Counter[str]


@torch.no_grad()
def embed_shards(
    model: DualEncoder,
    transform: Transform,
    tokenize: Tokenizer,
    spec: str,
    *,
    batch_size: int = 256,
) -> HeldOut:
    """Embed every usable sample of `spec`, in order, in batches of `batch_size`."""
    device = next(model.parameters()).device
    skipped: Counter[str] = Counter()
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    labels: list[int] = []
    batch: list[tuple[torch.Tensor, str, int]] = []

    def flush() -> None:
        images.append(model.encode_image(torch.stack([b[0] for b in batch]).to(device)).cpu())
        texts.append(model.encode_text(tokenize([b[1] for b in batch]).to(device)).cpu())
        labels.extend(b[2] for b in batch)
        batch.clear()

    for sample in iter_shards(spec, skipped):
        decoded = decode_or_skip(sample.image, skipped, key=sample.key)
        if decoded is None:
            continue
        image = transform(decoded)
        batch.append((image, sample.caption, int(sample.meta.get("label", -1))))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not images:
        raise ValueError(f"no usable samples in {spec!r} (skipped: {dict(skipped)})")
    return HeldOut(torch.cat(images), torch.cat(texts), torch.tensor(labels), skipped)


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
) -> dict[str, float]:
    """Retrieval recall@k on `spec`, and zero-shot top-1/top-5 if a zero-shot file is given.

    The zero-shot file is read first, so that a bad one fails before the shards are embedded.
    """
    zeroshot = load_zeroshot(zeroshot_file) if zeroshot_file else None
    was_training = model.training
    model.eval()
    try:
        held = embed_shards(model, transform, tokenize, spec, batch_size=batch_size)
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
        return metrics
    finally:
        model.train(was_training)


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
