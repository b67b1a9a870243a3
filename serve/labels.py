"""Zero-shot label embeddings: named label sets embedded once at start-up, and an LRU of prompts.

Embedding labels costs labels x templates text encodings; a client classifying many images with
the same labels (a UI, an evaluation loop) would pay that on every request without the cache.
The cache holds each (label, template) prompt's embedding, so only prompts never seen are
encoded; `ensemble` turns prompt embeddings into class embeddings.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.tokenize import fill_template
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


def prompts(labels: Sequence[str], templates: Sequence[str], max_chars: int) -> list[str]:
    """Every label in every template, label-major: [L * T] (as `common.model.class_embeddings`),
    each built only as far as the tokenizer reads (`max_chars`, `common.tokenize`): a template of
    many "{}" never expands beyond it, and the prompts tokenize as the full expansions would."""
    return [fill_template(template, label, max_chars) for label in labels for template in templates]


def ensemble(prompt_embeddings: np.ndarray, labels: int) -> np.ndarray:
    """[L * T, D] unit prompt embeddings -> [L, D] class embeddings: the normalised mean over each
    label's templates (prompt ensembling, as `common.model.class_embeddings`)."""
    per_label = prompt_embeddings.reshape(labels, -1, prompt_embeddings.shape[-1]).mean(axis=1)
    norms = np.linalg.norm(per_label, axis=1, keepdims=True)
    return (per_label / np.maximum(norms, 1e-12)).astype(np.float32)


class PromptCache:
    """Thread-safe bounded LRU: (model name, prompt) -> its [D] unit text embedding.

    Per prompt rather than per label set: a request that adds one label to a known set pays for
    that label's prompts only. A prompt is keyed by a 16-byte digest of its text (a bounded
    prompt, `prompts`), so an entry holds ~300 bytes besides its vector whatever the prompt:
    `entries` x (4 D + ~300) bytes in all (measured: 37 MiB for 16,384 entries of D = 512).
    """

    def __init__(self, entries: int = PROMPT_CACHE_ENTRIES) -> None:
        if entries < 0:
            raise ValueError(f"entries must be >= 0, got {entries}")
        self.entries = entries
        self._items: OrderedDict[tuple[str, bytes], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, model: str, texts: Sequence[str]) -> list[np.ndarray | None]:
        """The cached embedding of each text, or None where it is not cached."""
        keys = [(model, _digest(text)) for text in texts]
        with self._lock:
            found = []
            for key in keys:
                vector = self._items.get(key)
                if vector is not None:
                    self._items.move_to_end(key)
                found.append(vector)
            return found

    def put_many(self, model: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Cache `vectors` [N, D] for `texts`, dropping the least recently used beyond `entries`."""
        keys = [(model, _digest(text)) for text in texts]
        with self._lock:
            for key, vector in zip(keys, vectors, strict=True):
                self._items[key] = vector
                self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _digest(text: str) -> bytes:
    # "surrogatepass": a JSON body may carry a lone surrogate, which plain UTF-8 refuses
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
