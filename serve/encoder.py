"""Encode texts and images with a loaded model artifact; zero-shot labels by prompt ensembling.

One call, one forward pass; `serve.batching` groups concurrent requests' calls into batches.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from common.artifact import LoadedModel
from common.model import class_embeddings, length_groups, text_pooling
from common.preprocess import PreprocessCfg, preprocess_config


class Towers(Protocol):
    """What runs the forward passes: the torch `DualEncoder`, or `common.onnx_towers.OnnxTowers`."""

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...  # [N, L] -> [N, D] unit

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...  # [N, 3, H, W] -> [N, D]


class Encoder:
    """Thread-safe inference over one `LoadedModel`; every output is float32 numpy on the host.

    Calls are serialised by a lock: the handlers run in a threadpool, and interleaving forward
    passes on one model gains nothing on a CPU (torch already uses every core) while multiplying
    peak activation memory. `towers` (default: the loaded torch model) run the forward passes;
    tokenizer, transform and temperature always come from the artifact. Given other towers
    (ONNX Runtime's), the encoder keeps no reference to the torch model: once the caller drops
    its `LoadedModel`, the torch weights are freed.
    """

    def __init__(
        self, loaded: LoadedModel, device: str | torch.device = "cpu", towers: Towers | None = None
    ) -> None:
        model = loaded.model
        self.towers: Towers = towers if towers is not None else model
        self.tokenizer = loaded.tokenize
        self.transform = loaded.transform
        self.device = torch.device(device)
        self.model_name: str = model.name
        self.embed_dim: int = model.embed_dim
        # exp of the learned log inverse temperature: the scale of zero-shot logits
        self.logit_scale = float(model.logit_scale.detach().exp())
        # the eval transform's size and resize mode: what a request's image is resized to
        self.preprocess_cfg: PreprocessCfg = preprocess_config(model.clip)
        # how the text tower pools, where its padding can be cut (common.model.text_pooling)
        self.text_pooling = text_pooling(model.clip)
        self._lock = threading.Lock()

    @property
    def max_text_chars(self) -> int:
        """The characters of a text the tokenizer reads; the rest is cut unread."""
        return self.tokenizer.max_chars

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """N texts -> [N, D] unit vectors."""
        return self.encode_tokens(self.tokenize(texts))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """N texts -> their [N, C] token ids (the artifact's tokenizer, `common.tokenize`).

        No lock: like `preprocess`, it runs on the caller's thread, so the forward passes never
        wait for a request's tokenizing.
        """
        return self.tokenizer(list(texts))

    def encode_tokens(self, tokens: Sequence[torch.Tensor] | torch.Tensor) -> np.ndarray:
        """N texts' [C] token ids (`tokenize`) -> [N, D] unit vectors.

        Rows of different lengths (one request's texts, or several requests' in one batch) are
        encoded in groups of one bucketed length each (`length_groups`), not all at the longest.
        """
        with self._lock, torch.inference_mode():
            batch = torch.stack(list(tokens)).to(self.device)  # [N, C]
            groups = [] if self.text_pooling is None else length_groups(batch, self.text_pooling)
            if len(groups) <= 1:
                return _to_numpy(self.towers.encode_text(batch))
            out = np.empty((len(batch), self.embed_dim), np.float32)
            for rows in groups:
                out[rows.cpu().numpy()] = _to_numpy(self.towers.encode_text(batch[rows]))
            return out

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """N RGB images -> [N, D] unit vectors (the artifact's eval transform is applied here)."""
        return self.encode_pixels([self.preprocess(image) for image in images])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> its model-sized [3, H, W] input (the artifact's eval transform).

        No lock: transforms are per item and run on the caller's thread, so a decoded image can
        be dropped as soon as its small tensor exists.
        """
        pixels: torch.Tensor = self.transform(image)
        return pixels

    def encode_pixels(self, pixels: Sequence[torch.Tensor]) -> np.ndarray:
        """N preprocessed [3, H, W] images -> [N, D] unit vectors."""
        with self._lock, torch.inference_mode():
            batch = torch.stack(list(pixels)).to(self.device)  # [N, 3, H, W]
            return _to_numpy(self.towers.encode_image(batch))

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """[L, D] zero-shot classifier weights by prompt ensembling (`class_embeddings`)."""
        with self._lock, torch.inference_mode():
            prompts = class_embeddings(self.towers, self.tokenizer, labels, templates)
            return _to_numpy(prompts)


def zero_shot_probabilities(
    image_features: np.ndarray, label_features: np.ndarray, logit_scale: float
) -> np.ndarray:
    """[N, D] images x [L, D] labels -> [N, L] softmax over labels of scaled cosine similarity."""
    # float64: float32 rounding could give a probability a hair above 1
    logits = logit_scale * image_features.astype(np.float64) @ label_features.T.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy()
