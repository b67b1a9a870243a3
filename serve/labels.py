"""Zero-shot label embeddings: named label sets embedded once at start-up, and an LRU of prompts.

Embedding labels costs labels x templates text encodings; a client classifying many images with
the same labels (a UI, an evaluation loop) would pay that on every request without the cache.
The cache holds each (label, template) prompt's embedding, so only prompts never seen are
encoded; `ensemble` turns prompt embeddings into class embeddings.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serve.encoder import Encoder
from serve.settings import LabelSet

PROMPT_CACHE_ENTRIES = 16384


@dataclass(frozen=True, slots=True)
class LabelSetEmbeddings:
    """A configured label set with its classifier weights [L, D]."""

    name: str
    labels: list[str]
    templates: list[str]
    embeddings: np.ndarray


def embed_label_sets(
    encoder: Encoder, label_sets: dict[str, LabelSet], default_templates: list[str]
) -> dict[str, LabelSetEmbeddings]:
    """Each configured set's prompt-ensembled embeddings (its templates, else the defaults)."""
    embedded = {}
    for name, spec in label_sets.items():
        templates = spec.templates or default_templates
        embeddings = encoder.label_embeddings(spec.labels, templates)
        embedded[name] = LabelSetEmbeddings(name, spec.labels, templates, embeddings)
    return embedded


def prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every label in every template, label-major: [L * T] (as `common.model.class_embeddings`)."""
    # replace, not format: other braces in a user's template stay text instead of raising
    return [template.replace("{}", label) for label in labels for template in templates]


def ensemble(prompt_embeddings: np.ndarray, labels: int) -> np.ndarray:
    """[L * T, D] unit prompt embeddings -> [L, D] class embeddings: the normalised mean over each
    label's templates (prompt ensembling, as `common.model.class_embeddings`)."""
    per_label = prompt_embeddings.reshape(labels, -1, prompt_embeddings.shape[-1]).mean(axis=1)
    norms = np.linalg.norm(per_label, axis=1, keepdims=True)
    return (per_label / np.maximum(norms, 1e-12)).astype(np.float32)


class PromptCache:
    """Thread-safe bounded LRU: (model name, prompt) -> its [D] unit text embedding.

    Per prompt rather than per label set: a request that adds one label to a known set pays for
    that label's prompts only.
    """

    def __init__(self, entries: int = PROMPT_CACHE_ENTRIES) -> None:
        if entries < 0:
            raise ValueError(f"entries must be >= 0, got {entries}")
        self.entries = entries
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, model: str, texts: Sequence[str]) -> list[np.ndarray | None]:
        """The cached embedding of each text, or None where it is not cached."""
        with self._lock:
            found = []
            for text in texts:
                vector = self._items.get((model, text))
                if vector is not None:
                    self._items.move_to_end((model, text))
                found.append(vector)
            return found

    def put_many(self, model: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Cache `vectors` [N, D] for `texts`, dropping the least recently used beyond `entries`."""
        with self._lock:
            for text, vector in zip(texts, vectors, strict=True):
                self._items[(model, text)] = vector
                self._items.move_to_end((model, text))
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
