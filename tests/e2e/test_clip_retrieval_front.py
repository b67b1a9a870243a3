"""clip-retrieval's own web front and its `ClipClient`, unchanged, against this service.

The front (the `front/build` of a pinned `clip-retrieval` wheel, checked against its sha256) is
fetched with `pip download --no-deps` into a temporary directory — never installed, never part of
this project — and served from a loopback port with its `config.json` pointed at a key-less
`python -m serve` that allows the front's origin (CORS). Headless Chromium opens it with a query;
the index holds synthetic images without web URLs, so every picture the front shows is a
thumbnail inlined by /knn-service or /metadata. `ClipClient` is the wheel's own
`clip_retrieval/clip_client.py`, loaded from its file (see `load_clip_client`). The tests need the
package index (PyPI): without the wheel they fail, with the reason, rather than pass untested.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.browser import Browser
from tests.conftest import REPO_ROOT, free_port, running_service
from tests.serve_support import make_artifact, make_index, make_shard

pytestmark = pytest.mark.slow

SAMPLES = 24
# the release whose front this test was written against (a 343 KB wheel, no dependencies fetched)
CLIP_RETRIEVAL = "clip-retrieval==2.45.0"
WHEEL_SHA256 = "07f52947727b75fa0b22f0f938f352c90ea0f4fa3d4c0b2e3d284a42c1a497e4"
FRONT = "front/build/"
# the front's visible result pictures (in its shadow DOM), each loaded and decoded
SHOWN_PICTURES = """(() => {
  const front = document.querySelector("clip-front");
  const root = front && front.shadowRoot;
  if (!root) return 0;
  const pictures = [...root.querySelectorAll("#products figure")]
    .filter((f) => getComputedStyle(f).display !== "none")
    .map((f) => f.querySelector("img.pic"));
  return pictures.length && pictures.every((p) => p.complete && p.naturalWidth > 0)
    ? pictures.length : 0;
})()"""


def download_wheel(directory: Path) -> Path:
    """The pinned clip-retrieval wheel (pip download --no-deps), checked against its sha256."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--dest", str(directory), CLIP_RETRIEVAL]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=180)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"{CLIP_RETRIEVAL}'s wheel could not be downloaded: {exc.stderr[-500:]}")
    except subprocess.TimeoutExpired:
        pytest.fail(f"{CLIP_RETRIEVAL}'s wheel could not be downloaded in 180 s")
    (wheel,) = directory.glob("clip_retrieval-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert digest == WHEEL_SHA256, f"{wheel.name} is not the wheel this test pins ({digest})"
    return wheel


def extract_front(wheel: Path) -> Path:
    """The front's files (`front/build` of the wheel) in a folder beside it."""
    front = wheel.parent / "front"
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith(FRONT) and not name.endswith("/"):
                target = front / name[len(FRONT) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    assert (front / "index.html").is_file(), "the wheel has no front/build/index.html"
    return front


def load_clip_client(wheel: Path) -> Any:
    """clip-retrieval's own `clip_retrieval/clip_client.py` from the wheel, as a module.

    Loaded from its file rather than imported as `clip_retrieval.clip_client`: the package's
    `__init__` imports its back end (flask, faiss, torch models), whose pinned versions conflict
    with this project's (numpy<2, an older open_clip), so the package is not installed. The module
    itself needs only `requests` and the standard library, and runs unchanged."""
    target = wheel.parent / "clip_client.py"
    with zipfile.ZipFile(wheel) as archive:
        target.write_bytes(archive.read("clip_retrieval/clip_client.py"))
    spec = importlib.util.spec_from_file_location("clip_client", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return download_wheel(tmp_path_factory.mktemp("clip-retrieval-wheel"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A key-less service on 127.0.0.1 that allows the front's origin, and that origin's port."""
    root = tmp_path_factory.mktemp("clip-front")
    front_port = free_port()
    artifact = make_artifact(root)
    index = make_index(artifact, make_shard(root / "synth", SAMPLES), root / "index")
    env = {
        "DUET_CORS_ORIGINS": json.dumps([f"http://127.0.0.1:{front_port}"]),
        "DUET_ACCESS_LOG": "false",
    }
    with running_service(artifact, index, env=env) as base:
        yield base, front_port


@pytest.fixture(scope="module")
def front_url(wheel: Path, served: tuple[str, int]) -> Iterator[str]:
    """The front on 127.0.0.1, its config pointed at the service."""
    base, front_port = served
    front = extract_front(wheel)
    config = {"defaultBackend": base, "defaultIndex": "default"}
    (front / "config.json").write_text(json.dumps(config))
    handler = functools.partial(QuietHandler, directory=str(front))
    server = ThreadingHTTPServer(("127.0.0.1", front_port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{front_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_clip_retrieval_front_shows_the_result_pictures(front_url: str, tmp_path: Path) -> None:
    browser = Browser(tmp_path / "profile")
    try:
        browser.goto(f"{front_url}/?index=default&query={quote('a red circle')}")
        shown = browser.wait_for(SHOWN_PICTURES, timeout_s=60)
        # every result that came back with metadata is shown; none was hidden as a broken
        # picture (how many come back depends on the front's near-duplicate removal)
        with_metadata = (
            "document.querySelector('clip-front').images.filter((i) => i.caption).length"
        )
        assert shown == browser.evaluate(with_metadata) >= 1
        sources = browser.evaluate(
            "[...document.querySelector('clip-front').shadowRoot.querySelectorAll('img.pic')]"
            ".map((p) => p.getAttribute('src').slice(0, 23))"
        )
        assert set(sources) == {"data:image/png;base64, "}  # the inline thumbnails
        browser.screenshot(REPO_ROOT / "runs" / "test-screenshots" / "clip-retrieval-front.png")
    finally:
        browser.close()


def test_clip_client_queries_by_text_image_and_embedding(
    wheel: Path, served: tuple[str, int], tmp_path: Path
) -> None:
    base, _ = served
    clip_client = load_clip_client(wheel)
    client = clip_client.ClipClient(
        url=f"{base}/knn-service", indice_name="default", num_images=5, deduplicate=False
    )
    by_text = client.query(text="a red circle")
    assert len(by_text) == 5 and {"id", "similarity", "caption"} <= set(by_text[0])
    picture = tmp_path / "query.png"
    picture.write_bytes(base64.b64decode(by_text[0]["image"]))  # a thumbnail the index holds
    by_image = client.query(image=str(picture))
    assert len(by_image) == 5 and by_image[0]["similarity"] > 0.9
    vector = httpx.post(f"{base}/embed", json={"texts": ["a red circle"]}, timeout=30)
    by_embedding = client.query(embedding_input=vector.json()["text_embeddings"][0])
    assert [r["id"] for r in by_embedding] == [r["id"] for r in by_text]
