"""Encode texts and images with a loaded model artifact; classify images by prompt ensembling."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from common.artifact import LoadedModel
from common.model import class_embeddings


class Encoder:
    """Thread-safe inference over one `LoadedModel`; every output is float32 numpy on the host.

    Calls are serialised by a lock: the handlers run in a threadpool, and interleaving forward
    passes on one model gains nothing on a CPU (torch already uses every core) while multiplying
    peak activation memory.
    """

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu") -> None:
        self.loaded = loaded
        self.device = torch.device(device)
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self.loaded.model.name

    @property
    def embed_dim(self) -> int:
        return self.loaded.model.embed_dim

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """N texts -> [N, D] unit vectors."""
        with self._lock, torch.inference_mode():
            return _to_numpy(self._texts(texts))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """N RGB images -> [N, D] unit vectors (the artifact's eval transform is applied here)."""
        with self._lock, torch.inference_mode():
            return _to_numpy(self._images(images))

    def classify(
        self, images: Sequence[Image.Image], labels: Sequence[str], templates: Sequence[str]
    ) -> np.ndarray:
        """[N_images, N_labels] probabilities: softmax over labels of scaled cosine similarity.

        Labels are embedded by prompt ensembling (`common.model.class_embeddings`).
        """
        with self._lock, torch.inference_mode():
            model = self.loaded.model
            label_features = class_embeddings(model, self.loaded.tokenize, labels, templates)
            image_features = self._images(images)  # [N, D]
            logits = model.logit_scale.exp() * image_features @ label_features.T  # [N, L]
            return _to_numpy(logits.softmax(dim=-1))

    def _texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.loaded.tokenize(list(texts)).to(self.device)  # [N, L]
        return self.loaded.model.encode_text(tokens)

    def _images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.loaded.transform(image) for image in images])  # [N, 3, H, W]
        return self.loaded.model.encode_image(pixels.to(self.device))


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy()
