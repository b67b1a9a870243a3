"""The web page in a real browser: headless Chromium loads /?q=..., the page submits the search
form and renders result cards from a real `python -m serve` on a loopback port."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import running_service
from tests.serve_support import make_artifact, make_index, make_shard

pytestmark = pytest.mark.slow

SAMPLES = 24


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.fail("no chromium: install it (apt-get install -y chromium; `make test` does as root)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m serve` with a tiny random model and 24 synthetic images; its base URL."""
    root = tmp_path_factory.mktemp("page")
    artifact = make_artifact(root)
    index = make_index(artifact, make_shard(root / "synth", SAMPLES), root / "index")
    with running_service(artifact, index) as base:
        yield base


def rendered_dom(url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran (virtual time lets its fetches finish first)."""
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_search_from_the_page_renders_result_cards(server: str, tmp_path: Path) -> None:
    dom = rendered_dom(f"{server}/?q=a+red+circle&k=5", tmp_path / "profile")
    cards = re.findall(r'<article class="result-card" data-id="(\d+)">', dom)
    assert len(cards) == 5, dom[-3000:]
    assert re.search(r'id="query"[^>]*>', dom)
    status = re.search(r'id="status"[^>]*>([^<]*)<', dom)
    assert status and status.group(1).startswith('5 results for "a red circle"'), status
    scores = [float(s) for s in re.findall(r'<div class="score">([0-9.-]+)</div>', dom)]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert 'id="classify-panel"' in dom and '<option value="default">default (24)</option>' in dom


def test_page_shows_a_failed_search(server: str, tmp_path: Path) -> None:
    dom = rendered_dom(f"{server}/?q=a+red+circle&k=100000", tmp_path / "profile")
    assert "<article" not in dom
    assert re.search(r'id="status"[^>]*class="error"[^>]*>search failed: body.k', dom) or re.search(
        r'class="error"[^>]*id="status"', dom
    ), dom[-3000:]
