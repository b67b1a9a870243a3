"""Zero-shot accuracy and image<->text recall@k: pure functions, plus a runner over held-out shards.

`python -m train.evaluate --model ARTIFACT --data SHARDS [--zeroshot FILE]` evaluates any artifact.
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
from common.preprocess import InvalidImageError, Tokenizer, Transform, load_image
from common.shards import iter_shards

log = logging.getLogger(__name__)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows of [N, C] logits whose true label is among the k highest."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hits.float().mean().item()


def recall_at_k(similarity: torch.Tensor, k: int, chunk_rows: int = 4096) -> float:
    """Row i's match is column i: fraction of rows whose match ranks in the top k.

    Rank of the match = number of columns scoring strictly higher; computed in row chunks so
    the whole [N, N] matrix need not exist when `similarity` is a lazily-built block.
    """
    n = similarity.shape[0]
    hits = 0
    for start in range(0, n, chunk_rows):
        block = similarity[start : start + chunk_rows]  # [c, N]
        rows = torch.arange(start, start + block.shape[0], device=block.device)
        positive = block[torch.arange(block.shape[0]), rows]
        better = (block > positive[:, None]).sum(dim=1)
        hits += int((better < k).sum())
    return hits / n


def retrieval_metrics(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int]
) -> dict[str, float]:
    """text->image and image->text recall@k for paired unit vectors [N, D] x [N, D]."""
    similarity = text_features @ image_features.T  # [N texts, N images]
    metrics = {}
    for k in ks:
        metrics[f"text_to_image_recall@{k}"] = recall_at_k(similarity, k)
        metrics[f"image_to_text_recall@{k}"] = recall_at_k(similarity.T, k)
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
        try:
            image = transform(load_image(sample.image))
        except InvalidImageError:
            skipped["corrupt_image"] += 1
            continue
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


def evaluate(
    model: DualEncoder,
    transform: Transform,
    tokenize: Tokenizer,
    spec: str,
    *,
    zeroshot_file: str = "",
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
) -> dict[str, float]:
    """Retrieval recall@k on `spec`, and zero-shot top-1/top-5 if a zero-shot file is given."""
    was_training = model.training
    model.eval()
    try:
        held = embed_shards(model, transform, tokenize, spec, batch_size=batch_size)
        metrics: dict[str, float] = {"samples": float(len(held.labels))}
        metrics.update(retrieval_metrics(held.image_features, held.text_features, ks))
        if zeroshot_file:
            classnames, templates = load_zeroshot(zeroshot_file)
            known = held.labels >= 0
            if not bool(known.any()):
                raise ValueError(f"{spec!r}: no sample has a 'label' in its JSON for zero-shot")
            weights = class_embeddings(model, tokenize, classnames, templates).cpu()
            logits = held.image_features[known] @ weights.T
            metrics["zeroshot_top1"] = topk_accuracy(logits, held.labels[known], 1)
            metrics["zeroshot_top5"] = topk_accuracy(logits, held.labels[known], 5)
            metrics["zeroshot_chance"] = 1.0 / len(classnames)
        return metrics
    finally:
        model.train(was_training)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    from common.artifact import load_artifact

    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__)
    parser.add_argument("--model", required=True, help="model artifact directory")
    parser.add_argument("--data", required=True, help="held-out shards (brace ranges, '::')")
    parser.add_argument("--zeroshot", default="", help="classnames + templates JSON")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    loaded = load_artifact(args.model)
    metrics = evaluate(
        loaded.model,
        loaded.transform,
        loaded.tokenize,
        args.data,
        zeroshot_file=args.zeroshot,
        batch_size=args.batch_size,
    )
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
