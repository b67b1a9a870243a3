"""Zero-shot label embeddings: named label sets embedded once at start-up, and an LRU of the rest.

Embedding labels costs labels x templates text encodings; a client classifying many images with
the same labels (a UI, an evaluation loop) would pay that on every request without the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from serve.encoder import Encoder
from serve.settings import LabelSet

LABEL_CACHE_ENTRIES = 64


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


class LabelCache:
    """Thread-safe LRU: (labels, templates) -> [L, D] embeddings."""

    def __init__(self, entries: int = LABEL_CACHE_ENTRIES) -> None:
        self.entries = entries
        self._items: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def get(self, labels: list[str], templates: list[str]) -> np.ndarray | None:
        key = (tuple(labels), tuple(templates))
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, labels: list[str], templates: list[str], embeddings: np.ndarray) -> None:
        with self._lock:
            self._items[(tuple(labels), tuple(templates))] = embeddings
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
