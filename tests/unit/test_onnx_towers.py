"""ONNX towers: exported from an artifact, run by ONNX Runtime with torch's embeddings."""

from __future__ import annotations

import gc
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from common import onnx_towers
from common.artifact import load_artifact, write_artifact
from common.model import DualEncoder, build_model
from common.onnx_towers import OnnxExportError, OnnxTowers
from serve.app import create_app
from serve.settings import Settings
from tests.serve_support import make_index, make_shard, png, wait_until_loaded

pytestmark = pytest.mark.slow

TEXTS = ["dog", "a red circle", "a small red circle left of a large blue square in the corner"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("onnx") / "artifact"
    write_artifact(build_model("duet-micro"), out, provenance={})
    assert onnx_towers.main([str(out), "--int8"]) == 0
    return out


def test_onnx_towers_give_torchs_embeddings(artifact: Path):
    loaded = load_artifact(artifact)
    towers = OnnxTowers.load(artifact, "fp32")
    tokens = loaded.tokenize(TEXTS)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for rows in (slice(0, 1), slice(0, 2), slice(0, 3)):  # cut to 3, 5 and the full 20
            expected = loaded.model.encode_text(tokens[rows])
            torch.testing.assert_close(
                towers.encode_text(tokens[rows]), expected, atol=1e-5, rtol=0
            )
        for batch in (1, 3):  # the batch axis is dynamic
            expected = loaded.model.encode_image(pixels[:batch])
            torch.testing.assert_close(
                towers.encode_image(pixels[:batch]), expected, atol=1e-5, rtol=0
            )


def test_int8_towers_keep_the_embeddings_close(artifact: Path):
    loaded = load_artifact(artifact)
    towers = OnnxTowers.load(artifact, "int8")
    tokens = loaded.tokenize(TEXTS)
    with torch.no_grad():
        cosine = (towers.encode_text(tokens) * loaded.model.encode_text(tokens)).sum(-1)
    assert float(cosine.min()) >= 0.99
    for path in [artifact / "onnx", *(artifact / "onnx").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644)


def test_missing_towers_name_the_command(tmp_path: Path):
    out = write_artifact(build_model("duet-micro"), tmp_path / "artifact", provenance={})
    with pytest.raises(OnnxExportError, match="python -m common.onnx_towers"):
        OnnxTowers.load(out, "fp32")
    with pytest.raises(ValueError, match="variant"):
        OnnxTowers.load(out, "fp16")


def test_an_export_that_computes_differently_from_torch_is_refused(tmp_path: Path, capsys):
    """The fp32 parity gate: 1e4 added to the text tower's positional embedding leaves float32
    about 1e-3 of resolution for the signal in the residual stream, which torch and ONNX
    Runtime round differently: their embeddings differ by ~2e-2, far beyond 1e-4."""
    torch.manual_seed(0)
    model = build_model("duet-micro")
    with torch.no_grad():
        model.clip.positional_embedding.add_(1e4)
    out = write_artifact(model, tmp_path / "artifact", provenance={})
    assert onnx_towers.main([str(out)]) == 2
    assert "error: ONNX fp32 embeddings differ from torch's by" in capsys.readouterr().err
    assert not (out / "onnx").exists()


def test_an_int8_quantisation_below_the_cosine_floor_is_refused(tmp_path: Path):
    """The int8 gate: one outlier row (100 against weights of ~0.1) in the text projection, on a
    feature LayerNorm zeroes, leaves fp32 exact but sets the per-tensor int8 scale so coarse that
    the other weights round away: the fp32 towers pass, the int8 ones are refused."""
    torch.manual_seed(0)
    model = build_model("duet-micro")
    with torch.no_grad():
        model.clip.ln_final.weight[0] = model.clip.ln_final.bias[0] = 0.0
        model.clip.text_projection[0, :] = 100.0
    out = write_artifact(model, tmp_path / "artifact", provenance={})
    with pytest.raises(OnnxExportError, match=r"int8 embeddings have cosine 0\.\d+ .*< 0\.99"):
        onnx_towers.export_onnx(out, int8=True)
    assert not (out / "onnx").exists()
    assert onnx_towers.export_onnx(out)["checks"]["fp32"]["max_abs_difference"] < 1e-4


def test_the_service_on_onnx_runtime_answers_as_on_torch(artifact: Path, tmp_path: Path):
    shard = make_shard(tmp_path / "data", samples=40)
    index = make_index(artifact, shard, tmp_path / "index")
    answers = {}
    for runtime in ("torch", "onnx", "onnx-int8"):
        settings = Settings(artifact_dir=artifact, index_dir=index, runtime=runtime)
        with TestClient(create_app(settings)) as client:
            assert wait_until_loaded(client).status_code == 200
            text = client.post("/search", json={"text": "a red circle", "k": 5}).json()
            image = client.post("/search", files={"image": png(40)}, data={"k": "5"}).json()
            labels = {"labels": ["red circle", "blue square"], "templates": ["a {}."]}
            classify = client.post("/classify", files={"image": png(40)}, data=labels).json()
        answers[runtime] = (text, image, classify)
    for runtime in ("onnx", "onnx-int8"):
        tolerance = 1e-4 if runtime == "onnx" else 0.05
        for ours, torchs in zip(answers[runtime][:2], answers["torch"][:2], strict=True):
            scores = [r["score"] for r in ours["results"]]
            expected = [r["score"] for r in torchs["results"]]
            assert scores == pytest.approx(expected, abs=tolerance)
        if runtime == "onnx":
            assert [r["id"] for r in ours["results"]] == [r["id"] for r in torchs["results"]]
    probabilities = {
        runtime: [p["probability"] for p in answers[runtime][2]["predictions"]]
        for runtime in ("torch", "onnx")
    }
    assert probabilities["onnx"] == pytest.approx(probabilities["torch"], abs=1e-4)


def test_onnx_runtime_without_towers_is_not_ready_and_says_why(tmp_path: Path):
    out = write_artifact(build_model("duet-micro"), tmp_path / "artifact", provenance={})
    index = make_index(out, make_shard(tmp_path / "data", samples=8), tmp_path / "index")
    settings = Settings(artifact_dir=out, index_dir=index, runtime="onnx")
    with TestClient(create_app(settings)) as client:
        ready = wait_until_loaded(client)
    assert ready.status_code == 503 and "common.onnx_towers" in ready.json()["error"]
    with pytest.raises(ValueError, match="runs on the CPU"):
        Settings(artifact_dir=out, index_dir=index, runtime="onnx", device="cuda")


def test_an_index_built_on_the_onnx_runtimes_matches_torchs(
    artifact: Path, tmp_path: Path, capsys
) -> None:
    import numpy as np

    from serve.indexing import build as build_cli
    from serve.indexing.build import RUNTIMES, build_index
    from serve.indexing.index import SearchIndex

    shard = make_shard(tmp_path / "data", samples=12)
    vectors = {}
    for runtime in RUNTIMES:
        out = tmp_path / runtime
        build_index(artifact, shard, out, batch_size=5, runtime=runtime)
        index = SearchIndex.load(out)
        vectors[runtime] = index.vectors(list(range(index.count)))
        assert index.count == 12 and index.manifest["runtime"] == runtime
        index.close()
    np.testing.assert_allclose(vectors["onnx"], vectors["torch"], rtol=0, atol=1e-4)
    assert not np.array_equal(vectors["onnx"], vectors["torch"])  # ONNX Runtime's own kernels
    cosine = (vectors["onnx-int8"] * vectors["torch"]).sum(-1)
    assert cosine.min() >= 0.99 and not np.allclose(vectors["onnx-int8"], vectors["torch"])
    bare = write_artifact(build_model("duet-micro"), tmp_path / "bare", provenance={})
    argv = [
        "--model",
        str(bare),
        "--data",
        shard,
        "--out",
        str(tmp_path / "x"),
        "--runtime",
        "onnx",
    ]
    assert build_cli.main(argv) == 2
    assert "python -m common.onnx_towers" in capsys.readouterr().err


def live_torch_models() -> int:
    gc.collect()
    return sum(type(o) is DualEncoder for o in gc.get_objects())


def test_a_build_on_onnx_runtime_keeps_no_torch_model(artifact: Path):
    """The build's encoder on ONNX towers holds tokenizer and transform, not the torch weights
    (they were a resident copy of the model beside ONNX Runtime's for the whole build)."""
    from serve.indexing.build import load_encoder

    before = live_torch_models()
    torch_encoder = load_encoder(artifact, "torch", "cpu")
    assert live_torch_models() == before + 1  # the count sees a model that is kept
    del torch_encoder
    for runtime in ("onnx", "onnx-int8"):
        encoder = load_encoder(artifact, runtime, "cpu")
        assert live_torch_models() == before, runtime
        assert encoder.encode_texts(["a red circle"]).shape == (1, encoder.embed_dim)


def test_a_build_refuses_onnx_towers_that_do_not_match_their_artifact(
    artifact: Path, tmp_path: Path, capsys
):
    """Towers of another model (the fixture's, copied into an artifact of other weights) are
    checked against the torch model before a photo is read: refused, and no index is made."""
    from serve.indexing import build as build_cli

    torch.manual_seed(1)
    other = write_artifact(build_model("duet-micro"), tmp_path / "other", provenance={})
    shutil.copytree(artifact / onnx_towers.ONNX_DIR, other / onnx_towers.ONNX_DIR)
    shard = make_shard(tmp_path / "data", samples=4)
    for runtime, message in (("onnx", "differ from torch's"), ("onnx-int8", "cosine")):
        out = tmp_path / runtime
        argv = ["--model", str(other), "--data", shard, "--out", str(out), "--runtime", runtime]
        assert build_cli.main(argv) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


class RecordingSession:
    """A real ONNX Runtime session that records the batch size of each run."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.rows: list[int] = []

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        (inputs,) = feeds.values()
        self.rows.append(len(inputs))
        return self.session.run(outputs, feeds)


def test_big_batches_run_in_slices_with_the_same_embeddings(artifact: Path):
    """A batch bigger than ROWS_PER_RUN runs in slices of it (ONNX Runtime's arena keeps the
    activations of the biggest run: a ViT-B-32 batch of 256 grew it by GBs); the embeddings are
    those of one run of the whole batch."""
    towers = OnnxTowers.load(artifact, "fp32")
    loaded = load_artifact(artifact)
    size = loaded.model.clip.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    count = 2 * onnx_towers.ROWS_PER_RUN + 6
    pixels = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = loaded.tokenize([f"photo number {i}" for i in range(count)])
    whole_image = towers.image.run(None, {"pixels": pixels.numpy()})[0]
    whole_text = towers.text.run(None, {"tokens": tokens.numpy().astype(np.int64)})[0]
    towers.image, towers.text = RecordingSession(towers.image), RecordingSession(towers.text)
    sliced = [towers.encode_image(pixels), towers.encode_text(tokens)]
    slices = [onnx_towers.ROWS_PER_RUN, onnx_towers.ROWS_PER_RUN, 6]
    assert towers.image.rows == slices and towers.text.rows == slices
    torch.testing.assert_close(sliced[0], torch.from_numpy(whole_image), rtol=0, atol=1e-5)
    torch.testing.assert_close(sliced[1], torch.from_numpy(whole_text), rtol=0, atol=1e-5)
    assert towers.encode_image(pixels[:3]).shape == (3, whole_image.shape[1])
    assert towers.image.rows[-1] == 3
