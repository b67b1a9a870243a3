"""Fixtures shared by the suite: a small synthetic dataset, written once per session."""

from pathlib import Path

import pytest

from train.synth import generate


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train shards x 250 samples and 500 held-out samples of the built-in synthetic data."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, train_shards=8, samples_per_shard=250, seed=0, val_samples=500)
    return out
