"""A user's own model and pictures: a hub-layout folder -> `common.export` -> an index of a folder
of pictures -> the running service finds each picture by itself and says where it came from."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from common import export as export_cli
from serve.indexing import build as build_index_cli
from tests.conftest import running_service
from tests.unit.test_export import random_state, write_hub_folder
from tests.unit.test_sources import photo_folder

pytestmark = pytest.mark.slow


def test_own_model_and_folder_of_pictures_served(tmp_path: Path, capsys) -> None:
    hub = tmp_path / "CLIP-duet-tiny-laion"
    write_hub_folder("duet-tiny", random_state("duet-tiny"), hub)  # a ResNet with BatchNorm
    artifact = tmp_path / "artifact"
    assert export_cli.main([str(hub), "--out", str(artifact)]) == 0
    photos = photo_folder(tmp_path / "photos")
    index = tmp_path / "index"
    build = ["--model", str(artifact), "--data", str(photos), "--out", str(index)]
    assert build_index_cli.main(build) == 0
    assert "indexed 5 images" in capsys.readouterr().out  # the folder's TIFF is not

    with running_service(artifact, index) as base, httpx.Client(base_url=base, timeout=30) as http:
        picture = photos / "photo0.jpg"
        with open(picture, "rb") as f:
            found = http.post("/search", files={"image": f}, data={"k": "3"})
        assert found.status_code == 200, found.text
        top = found.json()["results"][0]
        assert top["metadata"]["source"] == "photo0.jpg" and top["score"] > 0.999
        assert top["caption"] == "a blue picture" and top["metadata"]["camera"] == "x100"
        by_text = http.post("/search", json={"text": "a blue picture", "k": 6})
        assert by_text.status_code == 200 and len(by_text.json()["results"]) == 5
        model = http.get("/indices").json()
        assert "CLIP-duet-tiny-laion" in str(model)
