"""The rerank factor an approximate index is served with, chosen at build time from measured recall.

Compressed codes rank a text query's neighbours worse than an image's: a caption or a class
prompt sits across the modality gap, among many near-equal images, and 4-bit PQ codes put some
of its true top 10 below the k x 20 candidates re-ranked (docs/benchmarks.md: recall@10 0.94 for
image queries, 0.85 for captions, 0.74 for class prompts on one 100k index). More candidates fix
it where more cells do not, so the build measures recall@10 for stored images and for sampled
captions against exact search, and doubles the factor from the plan's default until both reach
the target or the factor reaches RERANK_FACTOR_CAP. The exact top 10 of the queries is found
once; each step only searches again.

A factor given by the user is never changed. The factor chosen and the figures of every step
go to the manifest (`rerank_tuning`), and the service searches with the manifest's
`rerank_factor`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.indexing.delta import StoredRows
from serve.indexing.vector_search import (
    MAX_RERANK_CANDIDATES,
    RECALL_K,
    VectorSearcher,
    exact_knn,
    recall_of,
    recall_without_self,
    sample_rows,
)

log = logging.getLogger(__name__)

RERANK_FACTOR_CAP = 200
"""The largest factor the build chooses: k = 10 re-ranks 2,000 candidates per query (1 MB of
float32 rows at D = 128); larger k are clamped by MAX_RERANK_CANDIDATES."""
assert RECALL_K * RERANK_FACTOR_CAP <= MAX_RERANK_CANDIDATES  # the cap is what gets searched


@dataclass(frozen=True, slots=True)
class RecallProbe:
    """Queries and their exact top 10 over the stored vectors, found once; `measure` scores a
    searcher against them at whatever rerank factor it has now."""

    image_ids: np.ndarray
    """[n] stored rows used as queries (each left out of both lists)."""
    image_queries: np.ndarray  # [n, D] float32
    image_truth: np.ndarray  # [n, 11] exact ids
    text_queries: np.ndarray | None  # [Q, D] float32: captions through the text tower
    text_truth: np.ndarray | None  # [Q, k] exact ids, k = min(10, N)

    @classmethod
    def sample(
        cls, vectors: StoredRows, image_queries: int, text_queries: np.ndarray | None, seed: int
    ) -> RecallProbe:
        """`image_queries` stored rows of `vectors` [N, D] and `text_queries`, with their truth."""
        n = min(image_queries, len(vectors)) if len(vectors) > RECALL_K else 0
        ids = sample_rows(len(vectors), n, seed)
        images = np.ascontiguousarray(vectors[ids], dtype=np.float32)
        image_truth = exact_knn(images, vectors, RECALL_K + 1)[1] if n else np.zeros((0, 0))
        texts = None if text_queries is None else np.ascontiguousarray(text_queries, np.float32)
        text_truth = None
        if texts is not None and len(texts) and len(vectors):
            text_truth = exact_knn(texts, vectors, min(RECALL_K, len(vectors)))[1]
        return cls(ids, images, image_truth, texts, text_truth)

    def measure(self, searcher: VectorSearcher) -> dict[str, Any]:
        """The manifest's recall figures of `searcher`: `recall_at_10` (None without image
        queries) and, for a build with text queries, `text_recall_at_10`."""
        figures: dict[str, Any] = {"recall_at_10": None, "recall_queries": len(self.image_ids)}
        if len(self.image_ids):
            found = searcher.search(self.image_queries, RECALL_K + 1)[1]
            figures["recall_at_10"] = recall_without_self(self.image_ids, self.image_truth, found)
        if self.text_queries is not None:  # a build with a text tower: None when none sampled
            figures["text_recall_at_10"] = None
            figures["text_recall_queries"] = len(self.text_queries)
        if self.text_queries is not None and self.text_truth is not None:
            found = searcher.search(self.text_queries, self.text_truth.shape[1])[1]
            figures["text_recall_at_10"] = recall_of(self.text_truth, found)
        return figures


def choose_rerank_factor(
    searcher: VectorSearcher, probe: RecallProbe, target: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Double `searcher.rerank_factor` (left set to the factor chosen) until both recall
    figures reach `target` or the factor reaches RERANK_FACTOR_CAP; (the final figures, the
    manifest's `rerank_tuning`: the target, whether it was met, every step tried)."""
    steps = []
    while True:
        figures = probe.measure(searcher)
        steps.append({"rerank_factor": searcher.rerank_factor, **_recalls(figures)})
        met = all(value >= target for value in _recalls(figures).values())
        if met or searcher.rerank_factor >= RERANK_FACTOR_CAP:
            break
        searcher.rerank_factor = min(RERANK_FACTOR_CAP, 2 * searcher.rerank_factor)
    if not met:
        log.warning(
            "recall@%d stays below the target %.2f at rerank factor %d (the cap): %s. The index "
            "is written as it is; for better recall build another type (--index-type hnsw, or "
            "flat) or 8-bit codes (--on-disk), or give --rerank-factor",
            RECALL_K,
            target,
            searcher.rerank_factor,
            ", ".join(f"{name} {value}" for name, value in _recalls(figures).items()),
        )
    elif len(steps) > 1:
        log.info("rerank factor raised to %d for the target: %s", searcher.rerank_factor, steps)
    return figures, {"recall_target": target, "target_met": met, "steps": steps}


def _recalls(figures: dict[str, Any]) -> dict[str, float]:
    """The figures measured (None: no such queries)."""
    names = ("recall_at_10", "text_recall_at_10")
    return {name: figures[name] for name in names if figures.get(name) is not None}
