"""The default runtime (auto): ONNX Runtime where the towers export and verify, else torch."""

from __future__ import annotations

import gc
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from common import onnx_towers
from common.artifact import load_artifact, write_artifact
from common.model import DualEncoder, build_model
from serve.app import create_app
from serve.runtime import load_encoder
from serve.settings import Settings
from tests.serve_support import make_index, make_shard, png, wait_until_loaded

pytestmark = pytest.mark.slow

LABEL_SETS = {"shapes": {"labels": ["red circle", "blue square"], "templates": ["a {}."]}}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A duet-micro artifact without ONNX towers and an index it built."""
    root = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    artifact = write_artifact(build_model("duet-micro"), root / "artifact", provenance={})
    index = make_index(artifact, make_shard(root / "data", samples=24), root / "index")
    return {"artifact": artifact, "index": index}


def settings(artifact: Path, index: Path, runtime: str) -> Settings:
    return Settings(artifact_dir=artifact, index_dir=index, runtime=runtime, label_sets=LABEL_SETS)


def answers(client: TestClient) -> list[Any]:
    """Every serving path's answer: search by text and image, classify with a named label set
    and with labels of the request, /embed, and /v1/embeddings for one short text and a batch."""
    texts = ["dog", "a red circle", "a small red circle left of a large blue square in a corner"]
    labels = {"labels": ["red circle", "green star"], "templates": ["a {}.", "the {}"]}
    responses = [
        client.post("/search", json={"text": "a red circle", "k": 5}),
        client.post("/search", files={"image": png(40)}, data={"k": "5"}),
        client.post("/classify", files={"image": png(40)}, data={"label_set": "shapes"}),
        client.post("/classify", files={"image": png(40)}, data=labels),
        client.post("/embed", json={"texts": texts}),
        client.post("/v1/embeddings", json={"input": "x", "model": "duet-micro"}),
        client.post("/v1/embeddings", json={"input": texts, "model": "duet-micro"}),
    ]
    assert [r.status_code for r in responses] == [200] * len(responses), responses[-1].text
    return [r.json() for r in responses]


def served(config: Settings, runtime: str) -> list[Any]:
    """`answers` of a service on `config`, which must run `runtime`; the service is gone after."""
    with TestClient(create_app(config)) as client:
        assert wait_until_loaded(client).json()["runtime"] == runtime
        return answers(client)


def live_torch_models() -> int:
    gc.collect()
    return sum(type(o) is DualEncoder for o in gc.get_objects())


def test_auto_exports_and_serves_every_path_as_torch_without_keeping_the_torch_model(
    built: dict[str, Path],
):
    artifact, index = built["artifact"], built["index"]
    expected = served(settings(artifact, index, "torch"), "torch")
    models_before = live_torch_models()
    assert not (artifact / "onnx").exists()
    with TestClient(create_app(settings(artifact, index, "auto"))) as client:
        ready = wait_until_loaded(client).json()
        assert (ready["runtime"], ready["runtime_fallback"]) == ("onnx", None)
        # the towers were exported into the artifact at this first start, and torch's are gone
        assert onnx_towers.has_towers(artifact)
        # not more: a model an earlier service's winding-down thread still held may go meanwhile
        assert live_torch_models() <= models_before
        got = answers(client)
    torch.testing.assert_close(nested_floats(got), nested_floats(expected), atol=1e-4, rtol=0)
    assert [r["id"] for r in got[0]["results"]] == [r["id"] for r in expected[0]["results"]]


def weight_bytes(model: DualEncoder) -> int:
    """Bytes of `model`'s tensors that hold storage (a dropped tower's are on meta)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if not t.is_meta]
    return sum(t.numel() * t.element_size() for t in tensors)


def live_torch_weight_bytes() -> int:
    gc.collect()
    return sum(weight_bytes(o) for o in gc.get_objects() if type(o) is DualEncoder)


def test_the_torch_weights_are_freed_before_the_onnx_towers_load(
    built: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    """Both resident at once were the memory peak of every ONNX start and build."""
    from serve.indexing.build import load_encoder as build_encoder

    artifact = built["artifact"]
    onnx_towers.export_once(artifact)
    load_towers = onnx_towers.OnnxTowers.load
    resident_at_load: list[int] = []

    def load_and_record(*args: Any, **kwargs: Any) -> onnx_towers.OnnxTowers:
        resident_at_load.append(live_torch_weight_bytes())
        return load_towers(*args, **kwargs)

    monkeypatch.setattr(onnx_towers.OnnxTowers, "load", load_and_record)
    whole_model = weight_bytes(load_artifact(artifact).model)
    before = live_torch_weight_bytes()
    encoder, runtime = load_encoder(settings(artifact, built["index"], "onnx"))
    assert runtime.name == "onnx" and encoder.encode_texts(["a red circle"]).shape[0] == 1
    built_with = build_encoder(artifact, "onnx", "cpu")
    assert built_with.encode_texts(["a red circle"]).shape[0] == 1
    # what stays is the temperature, the text projection and positions: a few percent
    assert len(resident_at_load) == 2
    assert all(bytes_ - before < whole_model / 20 for bytes_ in resident_at_load)


def nested_floats(value: Any) -> torch.Tensor:
    """Every number in a JSON answer, in order, as one float64 vector (ids and names must
    match exactly: they are checked as part of the structure)."""
    numbers: list[float] = []

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items() if k not in ("usage", "created", "took_ms")}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, bool) or not isinstance(v, int | float):
            return v
        numbers.append(float(v))
        return None

    walk(value)
    return torch.tensor(numbers, dtype=torch.float64)


def test_concurrent_first_starts_export_once_and_later_starts_reuse_the_towers(tmp_path: Path):
    torch.manual_seed(1)
    artifact = write_artifact(build_model("duet-micro"), tmp_path / "artifact", provenance={})
    results: list[bool] = []
    workers = [
        threading.Thread(target=lambda: results.append(onnx_towers.export_once(artifact)))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert sorted(results) == [False, True]  # one exported; the other waited and found them
    manifest = artifact / "onnx" / "manifest.json"
    exported = manifest.stat().st_ino
    index = make_index(artifact, make_shard(tmp_path / "data", samples=8), tmp_path / "index")
    with TestClient(create_app(settings(artifact, index, "auto"))) as client:
        assert wait_until_loaded(client).json()["runtime"] == "onnx"
    assert manifest.stat().st_ino == exported  # reused, not exported again


def test_a_model_whose_towers_do_not_verify_falls_back_to_torch_saying_why(
    built: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """1e4 on the positional embedding: ONNX Runtime and torch round it differently (see
    test_onnx_towers), so the export is refused; and towers exported from other weights than
    the artifact's are caught at start. Either way auto serves with torch and says why."""
    torch.manual_seed(2)
    model = build_model("duet-micro")
    with torch.no_grad():
        model.clip.positional_embedding.add_(1e4)
    unexportable = write_artifact(model, tmp_path / "unexportable", provenance={})
    stale = write_artifact(build_model("duet-micro"), tmp_path / "stale", provenance={})
    onnx_towers.export_once(built["artifact"])  # towers of other weights than `stale`'s
    shutil.copytree(built["artifact"] / "onnx", stale / "onnx")
    cases = {unexportable: "differ from torch's", stale: "differ from torch's"}
    for artifact, why in cases.items():
        with caplog.at_level("WARNING", logger="serve.runtime"):
            app = create_app(settings(artifact, built["index"], "auto"))
            with TestClient(app) as client:
                ready = wait_until_loaded(client).json()
                search = client.post("/search", json={"text": "a red circle", "k": 3})
        assert ready["runtime"] == "torch" and why in ready["runtime_fallback"]
        assert str(tmp_path) not in ready["runtime_fallback"]  # no absolute paths to clients
        assert search.status_code == 200 and len(search.json()["results"]) == 3
        assert any("runtime: torch, not ONNX Runtime" in r.getMessage() for r in caplog.records)
        caplog.clear()
    assert not (unexportable / "onnx").exists()
    # asked for by name, towers that do not match the weights are an error, not a fallback
    with TestClient(create_app(settings(stale, built["index"], "onnx"))) as client:
        refused = wait_until_loaded(client)
    assert refused.status_code == 503 and "differ from torch's" in refused.json()["error"]


def test_onnx_sessions_sleep_between_work_unless_asked_and_take_the_thread_setting(
    built: dict[str, Path],
):
    """Spinning ONNX Runtime threads take cores from every other process on the host while
    they wait: off unless DUET_ONNX_SPINNING asks, on both towers; DUET_ENCODE_THREADS sizes
    the sessions' thread pools (and torch's)."""
    onnx_towers.export_once(built["artifact"])
    threads_before = torch.get_num_threads()
    cases = [({}, "0", threads_before), ({"onnx_spinning": True, "encode_threads": 3}, "1", 3)]
    try:
        for overrides, spinning, threads in cases:
            config = settings(built["artifact"], built["index"], "onnx").model_copy(
                update=overrides
            )
            towers = load_encoder(config)[1].towers
            assert towers is not None
            for session in (towers.text, towers.image):
                options = session.get_session_options()
                for pool in ("intra_op", "inter_op"):
                    key = f"session.{pool}.allow_spinning"
                    assert options.get_session_config_entry(key) == spinning
                assert options.intra_op_num_threads == threads
    finally:
        torch.set_num_threads(threads_before)
